// Programmatic dependent launch (compute capability 9.0 and up; no-ops below and whenever a
// kernel was launched without the attribute). A kernel launched with
// CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION may start before the kernel ahead of it
// on its stream has finished; wait_for_prerequisites() returns once that kernel (and so all
// earlier work) has completed and its writes are visible. Every kernel multiq launches with
// the attribute calls it before touching memory that earlier work may write.
__device__ __forceinline__ void let_dependents_launch() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}
__device__ __forceinline__ void wait_for_prerequisites() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

