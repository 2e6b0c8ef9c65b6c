//! MLP weights in safetensors files, in the layout of PyTorch's `nn.Sequential` state dict.
//!
//! `nn.Sequential(Linear(512, 1024), ReLU(), Linear(1024, 1024), ReLU(), Linear(1024, 512))`
//! stores its parameters as `0.weight [1024, 512]`, `0.bias [1024]`, `2.weight [1024, 1024]`,
//! `2.bias [1024]`, `4.weight [512, 1024]`, `4.bias [512]` (a `Linear`'s weight is
//! `[out, in]`; the ReLUs at 1 and 3 have none). [`load`] checks every name, dtype and shape
//! against the architecture and names the tensor in its error; [`write()`] writes that layout,
//! so `torch.nn.Sequential(...).load_state_dict(safetensors.torch.load_file(path))` reads it.

use std::collections::HashSet;
use std::path::Path;

use safetensors::tensor::{Dtype, SafeTensors, TensorView};

use crate::error::{Error, Result};
use crate::tensor::{shape_str, SplitMix64};

/// An MLP's layer widths: `[512, 1024, 1024, 512]` is three Linear layers with a ReLU after
/// every one but the last.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MlpSpec {
    /// Input width, hidden widths, output width.
    pub widths: Vec<usize>,
}

impl Default for MlpSpec {
    /// The investigation's model: 512→1024→1024→512 (2,099,712 parameters).
    fn default() -> Self {
        MlpSpec {
            widths: vec![512, 1024, 1024, 512],
        }
    }
}

impl MlpSpec {
    /// Linear layers as (in, out).
    pub fn layers(&self) -> Vec<(usize, usize)> {
        self.widths.windows(2).map(|w| (w[0], w[1])).collect()
    }

    /// Input width (0 for a spec without widths, which [`MlpSpec::check`] refuses).
    pub fn input(&self) -> usize {
        self.widths.first().copied().unwrap_or(0)
    }

    /// Output width (0 for a spec without widths, which [`MlpSpec::check`] refuses).
    pub fn output(&self) -> usize {
        self.widths.last().copied().unwrap_or(0)
    }

    /// Parameters (weights and biases; `usize::MAX` where that many do not fit, which
    /// [`MlpSpec::check`] refuses).
    pub fn parameters(&self) -> usize {
        self.layers()
            .iter()
            .map(|&(i, o)| i.saturating_mul(o).saturating_add(o))
            .fold(0usize, usize::saturating_add)
    }

    /// Checks the spec: at least one layer, no zero width, and sizes that fit in memory's
    /// address range: every layer's weights, all parameters, and a width's activations for
    /// the most rows one forward takes ([`crate::model::MAX_FORWARD_ROWS`]).
    pub fn check(&self) -> Result<()> {
        if self.widths.len() < 2 || self.widths.contains(&0) {
            return Err(Error::Shape(format!(
                "an MLP needs at least two non-zero widths, got {}",
                shape_str(&self.widths)
            )));
        }
        let rows = crate::model::MAX_FORWARD_ROWS;
        let fits = self.widths.iter().all(|w| w.checked_mul(rows).is_some())
            && self
                .layers()
                .iter()
                .try_fold(0usize, |sum, &(i, o)| {
                    i.checked_mul(o)?.checked_add(o)?.checked_add(sum)
                })
                .is_some();
        if !fits {
            return Err(Error::Shape(format!(
                "an MLP of widths {} does not fit in memory's address range",
                shape_str(&self.widths)
            )));
        }
        Ok(())
    }

    /// The state-dict names and shapes of layer `i`: (`{2i}.weight`, `[out, in]`),
    /// (`{2i}.bias`, `[out]`).
    pub fn names(&self) -> Vec<(String, Vec<usize>)> {
        let mut out = Vec::new();
        for (i, (inp, o)) in self.layers().into_iter().enumerate() {
            out.push((format!("{}.weight", 2 * i), vec![o, inp]));
            out.push((format!("{}.bias", 2 * i), vec![o]));
        }
        out
    }

    /// `512→1024→1024→512`.
    pub fn describe(&self) -> String {
        self.widths
            .iter()
            .map(|w| w.to_string())
            .collect::<Vec<_>>()
            .join("→")
    }
}

/// An MLP's parameters on the host: per layer, the weight `[out, in]` (row-major) and the bias.
#[derive(Clone, Debug, PartialEq)]
pub struct HostWeights {
    /// The architecture.
    pub spec: MlpSpec,
    /// Per layer: (weight, bias).
    pub layers: Vec<(Vec<f32>, Vec<f32>)>,
}

impl HostWeights {
    /// Seeded random weights, drawn as PyTorch's `Linear` initialises them: weight and bias
    /// uniform in `[-1/sqrt(in), 1/sqrt(in))` (the values differ from PyTorch's generator; the
    /// distribution is the same). The same seed gives the same file everywhere.
    pub fn random(spec: &MlpSpec, seed: u64) -> Result<HostWeights> {
        spec.check()?;
        let mut rng = SplitMix64(seed);
        let layers = spec
            .layers()
            .into_iter()
            .map(|(inp, out)| {
                let bound = 1.0 / (inp as f32).sqrt();
                let mut draw = |n: usize| -> Vec<f32> {
                    (0..n)
                        .map(|_| (rng.next_f32() * 2.0 - 1.0) * bound)
                        .collect()
                };
                let w = draw(out * inp);
                let b = draw(out);
                (w, b)
            })
            .collect();
        Ok(HostWeights {
            spec: spec.clone(),
            layers,
        })
    }
}

fn bad(path: &Path, reason: impl Into<String>) -> Error {
    Error::BadInput {
        path: path.display().to_string(),
        reason: reason.into(),
    }
}

fn dtype_name(d: Dtype) -> String {
    format!("{d:?}")
}

/// Reads and checks the weights of `spec` from the safetensors file at `path`.
pub fn load(path: &Path, spec: &MlpSpec) -> Result<HostWeights> {
    spec.check()?;
    let bytes = std::fs::read(path).map_err(|source| Error::Io {
        path: path.display().to_string(),
        source,
    })?;
    parse(path, &bytes, spec)
}

/// Checks and converts the safetensors bytes of a file (named `path` in errors).
pub fn parse(path: &Path, bytes: &[u8], spec: &MlpSpec) -> Result<HostWeights> {
    let st = SafeTensors::deserialize(bytes).map_err(|e| {
        bad(
            path,
            format!("not a readable safetensors file (truncated or corrupt?): {e}"),
        )
    })?;
    let expected = spec.names();
    let expected_names: HashSet<&str> = expected.iter().map(|(n, _)| n.as_str()).collect();
    let mut present: Vec<String> = st.names().into_iter().map(str::to_string).collect();
    present.sort();
    let listing = || {
        expected
            .iter()
            .map(|(n, s)| format!("{n} {}", shape_str(s)))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let extra: Vec<&String> = present
        .iter()
        .filter(|n| !expected_names.contains(n.as_str()))
        .collect();
    if let Some(name) = extra.first() {
        return Err(bad(
            path,
            format!(
                "unexpected tensor `{name}`{} (the {} MLP has: {})",
                if extra.len() > 1 {
                    format!(" and {} more", extra.len() - 1)
                } else {
                    String::new()
                },
                spec.describe(),
                listing()
            ),
        ));
    }
    let mut tensors: Vec<Vec<f32>> = Vec::with_capacity(expected.len());
    for (name, shape) in &expected {
        let view: TensorView<'_> = st.tensor(name).map_err(|_| {
            bad(
                path,
                format!(
                    "missing tensor `{name}` (expected F32 {} for the {} MLP)",
                    shape_str(shape),
                    spec.describe()
                ),
            )
        })?;
        if view.dtype() != Dtype::F32 {
            return Err(bad(
                path,
                format!(
                    "tensor `{name}` has dtype {}, expected F32",
                    dtype_name(view.dtype())
                ),
            ));
        }
        if view.shape() != shape.as_slice() {
            return Err(bad(
                path,
                format!(
                    "tensor `{name}` has shape {}, expected {}",
                    shape_str(view.shape()),
                    shape_str(shape)
                ),
            ));
        }
        let data = view.data();
        let n: usize = shape.iter().product();
        if data.len() != n * 4 {
            return Err(bad(
                path,
                format!(
                    "tensor `{name}` holds {} bytes, expected {} for F32 {}",
                    data.len(),
                    n * 4,
                    shape_str(shape)
                ),
            ));
        }
        tensors.push(
            data.chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
        );
    }
    let mut it = tensors.into_iter();
    let layers = spec
        .layers()
        .iter()
        .map(|_| {
            let w = it.next().expect("a weight per layer");
            let b = it.next().expect("a bias per layer");
            (w, b)
        })
        .collect();
    Ok(HostWeights {
        spec: spec.clone(),
        layers,
    })
}

/// The safetensors bytes of `weights` (names and shapes as [`MlpSpec::names`]).
pub fn serialize(weights: &HostWeights) -> Result<Vec<u8>> {
    let names = weights.spec.names();
    let mut bytes: Vec<Vec<u8>> = Vec::new();
    for (w, b) in &weights.layers {
        bytes.push(w.iter().flat_map(|v| v.to_le_bytes()).collect());
        bytes.push(b.iter().flat_map(|v| v.to_le_bytes()).collect());
    }
    if bytes.len() != names.len() {
        return Err(Error::Shape(format!(
            "{} tensors for an MLP with {} parameter tensors",
            bytes.len(),
            names.len()
        )));
    }
    let views = names
        .iter()
        .zip(&bytes)
        .map(|((name, shape), data)| {
            TensorView::new(Dtype::F32, shape.clone(), data)
                .map(|v| (name.clone(), v))
                .map_err(|e| Error::Shape(format!("tensor `{name}`: {e}")))
        })
        .collect::<Result<Vec<_>>>()?;
    safetensors::tensor::serialize(views, None)
        .map_err(|e| Error::invalid(format!("cannot serialize the weights: {e}")))
}

/// Writes `weights` to `path` as safetensors, atomically (a temporary file, then a rename).
pub fn write(path: &Path, weights: &HostWeights) -> Result<()> {
    crate::atomic_file::write(path, &serialize(weights)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_spec_is_the_investigations_model() {
        let s = MlpSpec::default();
        // 2,097,152 weights + 2,560 biases (the issue says 2,099,200, which leaves out the
        // last layer's 512 biases; PyTorch's `sum(p.numel())` for this model is 2,099,712).
        assert_eq!(s.parameters(), 2_099_712);
        let names: Vec<String> = s.names().into_iter().map(|(n, _)| n).collect();
        assert_eq!(
            names,
            ["0.weight", "0.bias", "2.weight", "2.bias", "4.weight", "4.bias"]
        );
        assert_eq!(s.names()[0].1, vec![1024, 512]);
    }

    #[test]
    fn weights_round_trip_and_bad_files_name_the_tensor() {
        let spec = MlpSpec {
            widths: vec![4, 3, 2],
        };
        let w = HostWeights::random(&spec, 5).unwrap();
        assert_eq!(w, HostWeights::random(&spec, 5).unwrap());
        assert_ne!(w, HostWeights::random(&spec, 6).unwrap());
        let bound = 1.0 / 2.0;
        assert!(w.layers[0].0.iter().all(|v| v.abs() <= bound));
        let bytes = serialize(&w).unwrap();
        let p = Path::new("w.safetensors");
        assert_eq!(parse(p, &bytes, &spec).unwrap(), w);

        let err = |bytes: &[u8], spec: &MlpSpec| parse(p, bytes, spec).unwrap_err().to_string();
        // Truncated.
        let e = err(&bytes[..bytes.len() - 3], &spec);
        assert!(
            e.starts_with("w.safetensors: not a readable safetensors"),
            "{e}"
        );
        assert!(err(b"", &spec).contains("not a readable"));
        // Another architecture: extra and misshaped tensors.
        let e = err(&bytes, &MlpSpec { widths: vec![4, 3] });
        assert!(e.contains("unexpected tensor `2.bias`"), "{e}");
        let e = err(
            &bytes,
            &MlpSpec {
                widths: vec![4, 5, 2],
            },
        );
        assert!(
            e.contains("`0.weight` has shape [3, 4], expected [5, 4]"),
            "{e}"
        );
        // Missing.
        let e = err(
            &bytes,
            &MlpSpec {
                widths: vec![4, 3, 2, 2],
            },
        );
        assert!(e.contains("missing tensor `4.weight`"), "{e}");
        // Wrong dtype.
        let half: Vec<u8> = vec![0; 2 * 3 * 4];
        let views = vec![(
            "0.weight".to_string(),
            TensorView::new(Dtype::F16, vec![3, 4], &half).unwrap(),
        )];
        let f16 = safetensors::tensor::serialize(views, None).unwrap();
        let e = err(&f16, &MlpSpec { widths: vec![4, 3] });
        assert!(e.contains("`0.weight` has dtype F16, expected F32"), "{e}");
    }
}
