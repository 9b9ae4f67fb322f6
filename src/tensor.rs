//! GPU tensors: a storage buffer plus a shape and a dtype.
//!
//! Attention tensors are contiguous `[batch, heads, seq, dim]` (the layout of PyTorch's
//! `scaled_dot_product_attention`); the log-sum-exp is `[batch, heads, seq]` f32.

use crate::context::Context;
use crate::dtype::DType;
use crate::error::{Error, Result};
use half::f16;
use wgpu::util::DeviceExt;

/// Bytes of `n` elements of `dtype`, rounded up to the 4 bytes buffers are made of.
pub(crate) fn byte_size(n: usize, dtype: DType) -> u64 {
    ((n * dtype.size()) as u64).next_multiple_of(4)
}

/// Elements of `shape`, or an error when the count does not fit in `usize`.
fn element_count(shape: &[usize]) -> Result<usize> {
    shape
        .iter()
        .try_fold(1usize, |n, &d| n.checked_mul(d))
        .ok_or_else(|| Error::Shape(format!("shape {shape:?} has more elements than fit in memory")))
}

/// A borrowed GPU tensor: the caller's buffer, read as a contiguous array of `shape`.
/// This is what the `encode` functions take, so engines can pass their own buffers.
///
/// The fields are private so that every view went through [`TensorView::new`] (or
/// [`Tensor::view`]): a view's buffer always holds its shape, and the kernels' checks
/// can rely on that.
#[derive(Clone, Copy, Debug)]
pub struct TensorView<'a> {
    buffer: &'a wgpu::Buffer,
    shape: &'a [usize],
    dtype: DType,
}

impl<'a> TensorView<'a> {
    /// Checks that `buffer` holds at least `shape`'s elements of `dtype` and is a storage buffer.
    pub fn new(buffer: &'a wgpu::Buffer, shape: &'a [usize], dtype: DType) -> Result<Self> {
        let needed = element_count(shape)?
            .checked_mul(dtype.size())
            .ok_or_else(|| Error::Shape(format!("shape {shape:?} of {dtype} has more bytes than fit in memory")))?;
        if buffer.size() < needed as u64 {
            return Err(Error::Shape(format!(
                "buffer of {} bytes is too small for {shape:?} {dtype} ({needed} bytes)",
                buffer.size()
            )));
        }
        if !buffer.usage().contains(wgpu::BufferUsages::STORAGE) {
            return Err(Error::Option("tensor buffers need BufferUsages::STORAGE".into()));
        }
        Ok(Self { buffer, shape, dtype })
    }

    /// The caller's buffer; it may be longer than the view.
    pub fn buffer(&self) -> &'a wgpu::Buffer {
        self.buffer
    }
    /// The shape, outermost dimension first (row-major).
    pub fn shape(&self) -> &'a [usize] {
        self.shape
    }
    /// The element type the buffer is read as.
    pub fn dtype(&self) -> DType {
        self.dtype
    }
    /// Elements in the view: the product of its shape.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// Tensors wattn allocates are rounded up to whole 16-byte words, so that kernels may read
/// any tensor as vec4 words (the flash kernel does) whatever its last dimension.
const WORD_BYTES: usize = 16;

/// A GPU tensor owning its buffer.
pub struct Tensor {
    buffer: wgpu::Buffer,
    shape: Vec<usize>,
    dtype: DType,
}

impl Tensor {
    /// Uploads f32 host data, converted to `dtype`.
    pub fn from_f32(ctx: &Context, shape: &[usize], data: &[f32], dtype: DType) -> Result<Self> {
        let n = element_count(shape)?;
        if data.len() != n {
            return Err(Error::Shape(format!("{} values given for shape {shape:?} ({n} elements)", data.len())));
        }
        let mut bytes = match dtype {
            DType::F32 => bytemuck::cast_slice::<f32, u8>(data).to_vec(),
            DType::F16 => {
                let h: Vec<f16> = data.iter().map(|&x| f16::from_f32(x)).collect();
                bytemuck::cast_slice::<f16, u8>(&h).to_vec()
            }
        };
        Self::from_bytes(ctx, shape, &mut bytes, dtype)
    }

    /// Uploads f16 host data as f16 storage.
    pub fn from_f16(ctx: &Context, shape: &[usize], data: &[f16]) -> Result<Self> {
        let n = element_count(shape)?;
        if data.len() != n {
            return Err(Error::Shape(format!("{} values given for shape {shape:?} ({n} elements)", data.len())));
        }
        Self::from_bytes(ctx, shape, &mut bytemuck::cast_slice(data).to_vec(), DType::F16)
    }

    fn from_bytes(ctx: &Context, shape: &[usize], bytes: &mut Vec<u8>, dtype: DType) -> Result<Self> {
        check_binding_size(ctx, "tensor", bytes.len() as u64)?;
        bytes.resize(bytes.len().next_multiple_of(WORD_BYTES), 0);
        let buffer = ctx.device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
            label: Some("wattn tensor"),
            contents: bytes,
            usage: Self::USAGE,
        });
        Ok(Self { buffer, shape: shape.to_vec(), dtype })
    }

    /// An uninitialised (zeroed) tensor.
    pub fn zeros(ctx: &Context, shape: &[usize], dtype: DType) -> Result<Self> {
        let n = element_count(shape)?;
        let size = (n.checked_mul(dtype.size()))
            .map(|bytes| (bytes as u64).next_multiple_of(WORD_BYTES as u64))
            .ok_or_else(|| Error::Shape(format!("shape {shape:?} of {dtype} has more bytes than fit in memory")))?;
        check_binding_size(ctx, "tensor", size)?;
        let buffer = ctx.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("wattn tensor"),
            size,
            usage: Self::USAGE,
            mapped_at_creation: false,
        });
        Ok(Self { buffer, shape: shape.to_vec(), dtype })
    }

    const USAGE: wgpu::BufferUsages =
        wgpu::BufferUsages::STORAGE.union(wgpu::BufferUsages::COPY_SRC).union(wgpu::BufferUsages::COPY_DST);

    /// The shape, outermost dimension first (row-major).
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }
    /// The element type it is stored as.
    pub fn dtype(&self) -> DType {
        self.dtype
    }
    /// The storage buffer (usages `STORAGE | COPY_SRC | COPY_DST`), padded to a multiple of 4 bytes.
    pub fn buffer(&self) -> &wgpu::Buffer {
        &self.buffer
    }
    /// Elements in the tensor: the product of its shape.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
    /// A borrowed view of the whole tensor, for the `encode` functions.
    pub fn view(&self) -> TensorView<'_> {
        TensorView { buffer: &self.buffer, shape: &self.shape, dtype: self.dtype }
    }

    /// Downloads the tensor, converted to f32.
    pub fn to_f32(&self, ctx: &Context) -> Result<Vec<f32>> {
        read_f32(ctx, &self.buffer, self.numel(), self.dtype)
    }
}

/// Reads the first `n` elements of `dtype` from `buffer`, converted to f32. Waits for the GPU.
pub(crate) fn read_f32(ctx: &Context, buffer: &wgpu::Buffer, n: usize, dtype: DType) -> Result<Vec<f32>> {
    let bytes = read_buffer(ctx, buffer, byte_size(n, dtype))?;
    let bytes = &bytes[..n * dtype.size()];
    Ok(match dtype {
        DType::F32 => pod_values(bytes),
        DType::F16 => pod_values::<f16>(bytes).iter().map(|h| h.to_f32()).collect(),
    })
}

/// Reads all of `buffer` as `T`s (its size is a multiple of `T`'s). Waits for the GPU.
pub(crate) fn read_pod<T: bytemuck::Pod>(ctx: &Context, buffer: &wgpu::Buffer) -> Result<Vec<T>> {
    Ok(pod_values(&read_buffer(ctx, buffer, buffer.size())?))
}

/// The `T`s in `bytes`, copied one by one: a `Vec<u8>`'s allocation promises no alignment
/// beyond 1, so casting the slice in place could fail. A trailing partial value is dropped.
fn pod_values<T: bytemuck::Pod>(bytes: &[u8]) -> Vec<T> {
    bytes.chunks_exact(size_of::<T>()).map(bytemuck::pod_read_unaligned).collect()
}

/// Errors if `what` has more elements than the kernels' 32-bit indices reach.
pub(crate) fn check_u32_indexing(what: &str, elements: u64) -> Result<()> {
    if elements > u32::MAX as u64 {
        return Err(Error::Limit {
            what: format!("{what} element count"),
            needed: elements,
            allowed: u32::MAX as u64,
            limit: "32-bit indexing",
        });
    }
    Ok(())
}

/// Errors if one binding of `size` bytes would exceed the adapter's storage binding limit.
pub(crate) fn check_binding_size(ctx: &Context, what: &str, size: u64) -> Result<()> {
    let limits = ctx.limits();
    let allowed = limits.max_storage_buffer_binding_size.min(limits.max_buffer_size);
    if size > allowed {
        return Err(Error::Limit {
            what: format!("{what} buffer"),
            needed: size,
            allowed,
            limit: "max_storage_buffer_binding_size",
        });
    }
    Ok(())
}

/// Copies `size` bytes of `buffer` to the host (through a staging buffer) and waits.
pub(crate) fn read_buffer(ctx: &Context, buffer: &wgpu::Buffer, size: u64) -> Result<Vec<u8>> {
    let size = size.max(4);
    let staging = ctx.device.create_buffer(&wgpu::BufferDescriptor {
        label: Some("wattn readback"),
        size,
        usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
        mapped_at_creation: false,
    });
    let mut encoder = ctx.device.create_command_encoder(&Default::default());
    encoder.copy_buffer_to_buffer(buffer, 0, &staging, 0, size);
    ctx.queue.submit([encoder.finish()]);
    let (tx, rx) = std::sync::mpsc::channel();
    staging.map_async(wgpu::MapMode::Read, .., move |r| {
        let _ = tx.send(r);
    });
    ctx.wait_for(None)?;
    rx.recv()
        .map_err(|_| Error::Gpu("readback callback never ran".into()))?
        .map_err(|e| Error::Gpu(format!("mapping the readback buffer failed: {e}")))?;
    let bytes = staging.get_mapped_range(..).map_err(|e| Error::Gpu(e.to_string()))?.to_vec();
    staging.unmap();
    Ok(bytes)
}
