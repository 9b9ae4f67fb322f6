//! `wattn bench --varlen`: causal prefill of a server's batch of prompts of mixed lengths
//! (the same seeded lengths as `--serve`), three ways: one varlen launch over the packed
//! prompts, the same prompts padded to the longest in one dense launch, and one dense launch
//! per prompt (all recorded into one encoder). Tokens/s is prompt tokens per second; memory is
//! each layout's K/V bytes. The varlen output is checked against the per-prompt launches
//! before anything is timed. With `backward` (`--varlen --backward`), a training step: each
//! path runs the backward after the forward (the varlen one `backward::encode_varlen`), and
//! the varlen dQ and dK are checked as O is.

use crate::attention::backward::{self, GradientBuffers};
use crate::attention::varlen::{self, SeqLens};
use crate::attention::{AttentionBuffers, AttentionOptions, AttentionShape};
use crate::bench::Timer;
use crate::bench::serve::{ServeRow, ServeSettings, request_lengths};
use crate::context::Context;
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::flash::{self, FlashConfig};
use crate::tensor::Tensor;

/// Element `c` of head `head` of prompt `request`'s token at `position`, in [-1, 1); `salt`
/// tells Q, K and V apart. The same in every layout, so that the outputs can be compared.
fn value(salt: usize, request: usize, head: usize, position: usize, c: usize) -> f32 {
    ((salt * 31 + request * 7919 + position * 104_729 + head * 613 + c * 13) % 2003) as f32 / 1001.5 - 1.0
}

/// Q, K and V of prompts of `lengths` tokens, each `[1, heads, n, d]` laid out as
/// `[batch, heads, rows, d]` with `place(request, position)` giving the (batch, row) of a
/// token among `batch` x `rows`: packed, padded or one prompt alone.
struct Layout<'a> {
    batch: usize,
    rows: usize,
    place: &'a dyn Fn(usize, usize) -> (usize, usize),
}

impl Layout<'_> {
    fn tensor(&self, ctx: &Context, salt: usize, heads: usize, d: usize, lengths: &[(usize, usize)]) -> Result<Tensor> {
        let mut data = vec![0.0f32; self.batch * heads * self.rows * d];
        for &(request, n) in lengths {
            for position in 0..n {
                let (b, row) = (self.place)(request, position);
                for head in 0..heads {
                    let at = ((b * heads + head) * self.rows + row) * d;
                    for (c, x) in data[at..at + d].iter_mut().enumerate() {
                        *x = value(salt, request, head, position, c);
                    }
                }
            }
        }
        Tensor::from_f32(ctx, &[self.batch, heads, self.rows, d], &data, DType::F32)
    }

    /// Q, K, V, O and LSE of the layout.
    fn tensors(&self, ctx: &Context, s: &ServeSettings, lengths: &[(usize, usize)]) -> Result<[Tensor; 5]> {
        let (hq, hkv, d) = (s.q_heads, s.kv_heads, s.head_dim);
        Ok([
            self.tensor(ctx, 1, hq, d, lengths)?,
            self.tensor(ctx, 2, hkv, d, lengths)?,
            self.tensor(ctx, 3, hkv, d, lengths)?,
            Tensor::zeros(ctx, &[self.batch, hq, self.rows, d], DType::F32)?,
            Tensor::zeros(ctx, &[self.batch, hq, self.rows], DType::F32)?,
        ])
    }

    /// dO (values like Q's), dQ, dK and dV of the layout, for a training step.
    fn gradients(&self, ctx: &Context, s: &ServeSettings, lengths: &[(usize, usize)]) -> Result<[Tensor; 4]> {
        let (hq, hkv, d) = (s.q_heads, s.kv_heads, s.head_dim);
        Ok([
            self.tensor(ctx, 4, hq, d, lengths)?,
            Tensor::zeros(ctx, &[self.batch, hq, self.rows, d], DType::F32)?,
            Tensor::zeros(ctx, &[self.batch, hkv, self.rows, d], DType::F32)?,
            Tensor::zeros(ctx, &[self.batch, hkv, self.rows, d], DType::F32)?,
        ])
    }
}

fn buffers(t: &[Tensor; 5]) -> AttentionBuffers<'_> {
    AttentionBuffers { q: t[0].view(), k: t[1].view(), v: t[2].view(), out: t[3].view(), lse: t[4].view() }
}

fn gradient_buffers<'a>(t: &'a [Tensor; 5], g: &'a [Tensor; 4]) -> GradientBuffers<'a> {
    GradientBuffers { forward: buffers(t), d_out: g[0].view(), dq: g[1].view(), dk: g[2].view(), dv: g[3].view() }
}

/// One path's tensors: the forward's, and the backward's in a training step.
struct Step {
    tensors: [Tensor; 5],
    gradients: Option<[Tensor; 4]>,
}

impl Step {
    fn new(
        layout: &Layout<'_>,
        ctx: &Context,
        s: &ServeSettings,
        lengths: &[(usize, usize)],
        backward: bool,
    ) -> Result<Self> {
        let gradients = backward.then(|| layout.gradients(ctx, s, lengths)).transpose()?;
        Ok(Self { tensors: layout.tensors(ctx, s, lengths)?, gradients })
    }

    /// Records the dense forward, and the backward after it in a training step.
    fn encode_dense(
        &self,
        ctx: &Context,
        encoder: &mut wgpu::CommandEncoder,
        options: &AttentionOptions,
        config: &FlashConfig,
    ) -> Result<()> {
        flash::encode(ctx, encoder, &buffers(&self.tensors), None, options, config)?;
        match &self.gradients {
            Some(g) => backward::encode(ctx, encoder, &gradient_buffers(&self.tensors, g), None, options),
            None => Ok(()),
        }
    }

    /// What is compared across paths: O, and in a training step dQ and dK.
    fn results(&self, ctx: &Context) -> Result<Vec<Vec<f32>>> {
        let mut results = vec![self.tensors[3].to_f32(ctx)?];
        if let Some(g) = &self.gradients {
            results.extend([g[1].to_f32(ctx)?, g[2].to_f32(ctx)?]);
        }
        Ok(results)
    }
}

/// The largest difference between packed rows `got` (`[1, heads, total, d]`) and each request's
/// own `want` (`[1, heads, n, d]`).
fn packed_difference(
    got: &[f32],
    want: &[Vec<f32>],
    requests: &[(usize, usize)],
    seqlens: &SeqLens,
    heads: usize,
    d: usize,
) -> f32 {
    let total = seqlens.total_q();
    let mut err = 0.0f32;
    for ((request, n), single) in requests.iter().zip(want) {
        for head in 0..heads {
            let at = (head * total + seqlens.queries(*request).start) * d;
            let rows = got[at..at + n * d].iter().zip(&single[head * n * d..(head + 1) * n * d]);
            err = rows.fold(err, |e, (a, b)| e.max((a - b).abs()));
        }
    }
    err
}

/// Runs the three paths on `ctx` (with `backward`, each a training step: forward and
/// backward); `progress` hears each path's name first. A path over one of the adapter's limits
/// (the padded batch of long prompts, say) is skipped.
pub fn run(
    ctx: &Context,
    timer: &Timer,
    s: &ServeSettings,
    backward: bool,
    progress: &mut dyn FnMut(&str),
) -> Result<Vec<ServeRow>> {
    let lengths = request_lengths(s);
    let requests: Vec<(usize, usize)> = lengths.iter().copied().enumerate().collect();
    let lengths_u32: Vec<u32> = lengths.iter().map(|&n| n as u32).collect();
    let seqlens = SeqLens::new(&lengths_u32, &lengths_u32)?;
    let (total, longest) = (seqlens.total_q(), seqlens.max_q());
    let options = AttentionOptions::causal();
    // One tile configuration for every path: the one for the longest prompt.
    let (hq, hkv, d) = (s.q_heads, s.kv_heads, s.head_dim);
    let longest_shape =
        AttentionShape { batch: 1, q_heads: hq, kv_heads: hkv, n_q: longest, n_k: longest, d_qk: d, d_v: d };
    let config = FlashConfig::for_shape(ctx, &longest_shape, DType::F32, true).0;
    let kv_bytes = |batch: usize, rows: usize| (2 * batch * hkv * rows * d * 4) as u64;
    let row = |path, launches, stats, kv_bytes| ServeRow::measured(path, launches, total, stats, kv_bytes);
    let skipped_on_limit = ServeRow::skipped_on_limit;
    let mut rows = Vec::new();

    progress("per request");
    let mut want = None;
    let per_request = (|| {
        let alone = |_: usize, position: usize| (0, position);
        let singles = requests
            .iter()
            .map(|&(request, n)| {
                Step::new(&Layout { batch: 1, rows: n, place: &alone }, ctx, s, &[(request, n)], backward)
            })
            .collect::<Result<Vec<_>>>()?;
        let mut step = |encoder: &mut wgpu::CommandEncoder| -> Result<()> {
            for single in &singles {
                single.encode_dense(ctx, encoder, &options, &config)?;
            }
            Ok(())
        };
        let stats = timer.measure(ctx, s.warmup, s.runs, &mut step)?;
        want = Some(singles.iter().map(|single| single.results(ctx)).collect::<Result<Vec<_>>>()?);
        Ok(row("per request", requests.len(), stats, kv_bytes(1, total)))
    })();
    rows.push(skipped_on_limit("per request", per_request)?);

    progress("varlen");
    let packed = (|| {
        let packed = |request: usize, position: usize| (0, seqlens.queries(request).start + position);
        let step_tensors = Step::new(&Layout { batch: 1, rows: total, place: &packed }, ctx, s, &requests, backward)?;
        let mut step = |encoder: &mut wgpu::CommandEncoder| {
            let t = &step_tensors;
            varlen::encode(ctx, encoder, &buffers(&t.tensors), &seqlens, None, &options, &config)?;
            match &t.gradients {
                Some(g) => {
                    backward::encode_varlen(ctx, encoder, &gradient_buffers(&t.tensors, g), &seqlens, None, &options)
                }
                None => Ok(()),
            }
        };
        let stats = timer.measure(ctx, s.warmup, s.runs, &mut step)?;
        if let Some(want) = &want {
            // O and dQ over the query heads, dK over the KV heads.
            for (n, (what, got)) in ["O", "dQ", "dK"].iter().zip(step_tensors.results(ctx)?).enumerate() {
                let heads = if n == 2 { hkv } else { hq };
                let want: Vec<Vec<f32>> = want.iter().map(|results| results[n].clone()).collect();
                let err = packed_difference(&got, &want, &requests, &seqlens, heads, d);
                if !err.is_finite() || got.iter().any(|x| !x.is_finite()) || err > 1e-4 {
                    return Err(Error::Gpu(format!("varlen {what} differs from the per-request launches' by {err:e}")));
                }
            }
        }
        Ok(row("varlen", 1, stats, kv_bytes(1, total)))
    })();
    rows.push(skipped_on_limit("varlen", packed)?);

    progress("padded");
    let padded = (|| {
        let padded = |request: usize, position: usize| (request, position);
        let layout = Layout { batch: requests.len(), rows: longest, place: &padded };
        let step_tensors = Step::new(&layout, ctx, s, &requests, backward)?;
        let mut step = |encoder: &mut wgpu::CommandEncoder| step_tensors.encode_dense(ctx, encoder, &options, &config);
        let stats = timer.measure(ctx, s.warmup, s.runs, &mut step)?;
        Ok(row("padded", 1, stats, kv_bytes(requests.len(), longest)))
    })();
    rows.push(skipped_on_limit("padded", padded)?);
    Ok(rows)
}
