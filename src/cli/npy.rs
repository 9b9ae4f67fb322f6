//! Reading and writing NumPy `.npy` files (through `npyz`) for the command line.
//!
//! Only what attention needs: C-order float32 or float16 arrays in (and, for block-sparse
//! masks, bool or uint8 masks and int32 document ids; for varlen, int32 or uint32 sequence
//! lengths), float32 arrays out.
//! Outputs are written under a temporary name and renamed into place, so a failed run
//! leaves no half-written file and never replaces a file that was there before.

use crate::dtype::DType;
use crate::error::{Error, Result};
use half::f16;
use npyz::WriterBuilder;
use std::path::{Path, PathBuf};

/// An array read from a `.npy` file.
#[derive(Clone, Debug, PartialEq)]
pub struct NpyArray {
    pub shape: Vec<usize>,
    /// The element type stored in the file.
    pub dtype: DType,
    /// The values in C order. float16 values are widened exactly, so converting them back
    /// to f16 gives the file's bits again.
    pub data: Vec<f32>,
}

/// A boolean or integer array read from a `.npy` file: block-sparse masks and document ids.
#[derive(Clone, Debug, PartialEq)]
pub struct Array<T> {
    pub shape: Vec<usize>,
    /// The values in C order.
    pub data: Vec<T>,
}

/// Reads a C-order float32 or float16 array, of either byte order.
pub fn read_array(path: &Path) -> Result<NpyArray> {
    let bytes = read_bytes(path)?;
    let opened = open(path, &bytes, |d| element_type(d).map(|t| (t, t.size())), "float32 or float16")?;
    let dtype = opened.element;
    let decoded = match dtype {
        DType::F32 => opened.file.into_vec::<f32>(),
        DType::F16 => opened.file.into_vec::<f16>().map(|h| h.iter().map(|x| x.to_f32()).collect()),
    };
    let data = decoded.map_err(|e| file_error(path, format!("cannot decode: {e}")))?;
    Ok(NpyArray { shape: opened.shape, dtype, data })
}

/// Reads a C-order bool or uint8 array as booleans: non-zero is true.
pub fn read_bools(path: &Path) -> Result<Array<bool>> {
    let bytes = read_bytes(path)?;
    let one_byte = |d: &npyz::DType| match plain_type(d)? {
        (npyz::TypeChar::Bool | npyz::TypeChar::Uint, 1) => Some(((), 1)),
        _ => None,
    };
    let opened = open(path, &bytes, one_byte, "bool or uint8")?;
    Ok(Array { shape: opened.shape, data: opened.data.iter().map(|&b| b != 0).collect() })
}

/// Reads a C-order int32 array, of either byte order.
pub fn read_i32(path: &Path) -> Result<Array<i32>> {
    let bytes = read_bytes(path)?;
    let int32 = |d: &npyz::DType| (plain_type(d)? == (npyz::TypeChar::Int, 4)).then_some(((), 4));
    let opened = open(path, &bytes, int32, "int32")?;
    let data = opened.file.into_vec::<i32>().map_err(|e| file_error(path, format!("cannot decode: {e}")))?;
    Ok(Array { shape: opened.shape, data })
}

/// Reads a 1-D int32 or uint32 array of lengths, of either byte order, none negative.
pub fn read_lengths(path: &Path) -> Result<Vec<u32>> {
    let bytes = read_bytes(path)?;
    let int = |d: &npyz::DType| match plain_type(d)? {
        (npyz::TypeChar::Int, 4) => Some((true, 4)),
        (npyz::TypeChar::Uint, 4) => Some((false, 4)),
        _ => None,
    };
    let opened = open(path, &bytes, int, "int32 or uint32")?;
    if opened.shape.len() != 1 {
        return Err(file_error(path, format!("shape {:?}: lengths are 1-D, one per sequence", opened.shape)));
    }
    let decode_error = |e: std::io::Error| file_error(path, format!("cannot decode: {e}"));
    if !opened.element {
        return opened.file.into_vec::<u32>().map_err(decode_error);
    }
    let signed = opened.file.into_vec::<i32>().map_err(decode_error)?;
    signed
        .iter()
        .enumerate()
        .map(|(i, &n)| u32::try_from(n).map_err(|_| file_error(path, format!("length {i} is {n}: lengths are >= 0"))))
        .collect()
}

fn file_error(path: &Path, detail: String) -> Error {
    Error::File { path: path.to_path_buf(), detail }
}

fn read_bytes(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| file_error(path, format!("cannot read: {e}")))
}

/// A `.npy` file whose header passed the checks every reader makes.
struct Opened<'a, E> {
    /// What `element` made of the file's dtype.
    element: E,
    shape: Vec<usize>,
    /// The raw data bytes, exactly as many as the shape needs.
    data: &'a [u8],
    file: npyz::NpyFile<&'a [u8]>,
}

/// Parses the header of the `.npy` file `bytes` and checks it: C order, a dtype that
/// `element` accepts (giving its size in bytes; `supported` names the accepted ones), a
/// shape that fits, and exactly the data bytes the shape needs.
fn open<'a, E>(
    path: &Path,
    bytes: &'a [u8],
    element: impl FnOnce(&npyz::DType) -> Option<(E, usize)>,
    supported: &str,
) -> Result<Opened<'a, E>> {
    let fail = |detail: String| file_error(path, detail);
    let mut rest = bytes;
    let header = npyz::NpyHeader::from_reader(&mut rest)
        .map_err(|e| fail(format!("not a .npy file ({})", one_line(&e.to_string()))))?;
    if header.order() == npyz::Order::Fortran {
        return Err(fail("array is in Fortran order; save it in C order (numpy.ascontiguousarray)".into()));
    }
    let (element, size) = element(&header.dtype())
        .ok_or_else(|| fail(format!("dtype {} is not supported: use {supported}", header.dtype().descr())))?;
    let shape = header
        .shape()
        .iter()
        .map(|&d| usize::try_from(d))
        .collect::<std::result::Result<Vec<usize>, _>>()
        .map_err(|_| fail(format!("shape {:?} does not fit this machine", header.shape())))?;
    let expected = shape
        .iter()
        .try_fold(size, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| fail(format!("shape {shape:?} is too large")))?;
    // Checked before decoding so a corrupt header cannot make us allocate its claimed size.
    if rest.len() != expected {
        return Err(fail(format!(
            "holds {} data bytes but shape {shape:?} of {} needs {expected} (truncated or corrupt?)",
            rest.len(),
            header.dtype().descr()
        )));
    }
    Ok(Opened { element, shape, data: rest, file: npyz::NpyFile::with_header(header, rest) })
}

/// The type code and size of a plain (non-record) dtype.
fn plain_type(dtype: &npyz::DType) -> Option<(npyz::TypeChar, u64)> {
    let npyz::DType::Plain(ty) = dtype else { return None };
    Some((ty.type_char(), ty.size_field()))
}

/// Float32 and float16 in either byte order; everything else is refused.
fn element_type(dtype: &npyz::DType) -> Option<DType> {
    match plain_type(dtype)? {
        (npyz::TypeChar::Float, 4) => Some(DType::F32),
        (npyz::TypeChar::Float, 2) => Some(DType::F16),
        _ => None,
    }
}

/// Some parse errors span several lines; error messages are one line.
fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Writes a float32 array beside `path` under a temporary name; [`StagedFile::commit`] moves
/// it into place. Staging every output before committing any keeps a run that fails
/// half-way from writing some of its outputs.
pub fn stage_f32(path: &Path, shape: &[usize], data: &[f32]) -> Result<StagedFile> {
    let fail = |detail: String| Error::File { path: path.to_path_buf(), detail };
    let n: usize = shape.iter().product();
    if data.len() != n {
        return Err(Error::Shape(format!("{} values given for shape {shape:?} ({n} elements)", data.len())));
    }
    let name = path.file_name().ok_or_else(|| fail("is not a file name".into()))?;
    let mut temp_name = std::ffi::OsString::from(".");
    temp_name.push(name);
    temp_name.push(format!(".{}.tmp", std::process::id()));
    let staged = StagedFile { temp: path.with_file_name(temp_name), dest: path.to_path_buf(), committed: false };
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&staged.temp)
        .map_err(|e| fail(format!("cannot create {}: {e}", staged.temp.display())))?;
    let shape_u64: Vec<u64> = shape.iter().map(|&d| d as u64).collect();
    let written = (|| -> std::io::Result<()> {
        let mut out = std::io::BufWriter::new(file);
        let mut writer = npyz::WriteOptions::new().default_dtype().shape(&shape_u64).writer(&mut out).begin_nd()?;
        writer.extend(data.iter().copied())?;
        writer.finish()?;
        out.into_inner().map_err(|e| e.into_error())?.sync_all()
    })();
    // On error `staged` is dropped here, which removes the temporary file.
    written.map_err(|e| fail(format!("cannot write: {e}")))?;
    Ok(staged)
}

/// A file written under a temporary name; removed unless committed.
#[derive(Debug)]
pub struct StagedFile {
    temp: PathBuf,
    dest: PathBuf,
    committed: bool,
}

impl StagedFile {
    /// Renames the file into place, replacing any file at the destination in one step.
    pub fn commit(mut self) -> Result<()> {
        std::fs::rename(&self.temp, &self.dest)
            .map_err(|e| Error::File { path: self.dest.clone(), detail: format!("cannot write: {e}") })?;
        self.committed = true;
        Ok(())
    }
}

impl Drop for StagedFile {
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_file(&self.temp);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Writes a float32 array to `path` atomically.
    fn write_f32(path: &Path, shape: &[usize], data: &[f32]) -> Result<()> {
        stage_f32(path, shape, data)?.commit()
    }

    /// A fresh empty directory for one test.
    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("wattn-npy-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn write_with_npyz<T: npyz::Serialize + Copy>(
        path: &Path,
        descr: &str,
        order: npyz::Order,
        shape: &[u64],
        data: &[T],
    ) {
        let mut bytes = Vec::new();
        let mut w = npyz::WriteOptions::<T>::new()
            .dtype(npyz::DType::Plain(descr.parse().unwrap()))
            .order(order)
            .shape(shape)
            .writer(&mut bytes)
            .begin_nd()
            .unwrap();
        w.extend(data.iter().copied()).unwrap();
        w.finish().unwrap();
        std::fs::write(path, bytes).unwrap();
    }

    fn detail(err: Error) -> String {
        match err {
            Error::File { detail, .. } => detail,
            other => panic!("expected a file error, got {other:?}"),
        }
    }

    #[test]
    fn f32_round_trip_leaves_no_temporary_file() {
        let dir = scratch("round-trip");
        let path = dir.join("a.npy");
        let data: Vec<f32> = (0..24).map(|i| i as f32 * 0.5 - 3.0).collect();
        write_f32(&path, &[2, 3, 4], &data).unwrap();
        let back = read_array(&path).unwrap();
        assert_eq!(back, NpyArray { shape: vec![2, 3, 4], dtype: DType::F32, data });
        let names: Vec<_> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, ["a.npy"]);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn f16_is_widened_exactly_and_big_endian_is_read() {
        let dir = scratch("f16");
        let halves: Vec<f16> = [0.1f32, -2.5, 65504.0, 6e-8].iter().map(|&x| f16::from_f32(x)).collect();
        for descr in ["<f2", ">f2"] {
            let path = dir.join("h.npy");
            write_with_npyz(&path, descr, npyz::Order::C, &[4], &halves);
            let back = read_array(&path).unwrap();
            assert_eq!(back.dtype, DType::F16);
            let bits: Vec<u16> = back.data.iter().map(|&x| f16::from_f32(x).to_bits()).collect();
            assert_eq!(bits, halves.iter().map(|h| h.to_bits()).collect::<Vec<_>>(), "{descr}");
        }
        let path = dir.join("be.npy");
        write_with_npyz(&path, ">f4", npyz::Order::C, &[2], &[1.5f32, -7.25]);
        assert_eq!(read_array(&path).unwrap().data, [1.5, -7.25]);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn rejects_other_dtypes_fortran_order_and_bad_files() {
        let dir = scratch("reject");
        let path = dir.join("x.npy");
        write_with_npyz(&path, "<i8", npyz::Order::C, &[2], &[1i64, 2]);
        assert!(detail(read_array(&path).unwrap_err()).contains("'<i8' is not supported"));
        write_with_npyz(&path, "<f8", npyz::Order::C, &[2], &[1f64, 2.0]);
        assert!(detail(read_array(&path).unwrap_err()).contains("'<f8' is not supported"));
        write_with_npyz(&path, "<f4", npyz::Order::Fortran, &[2, 2], &[1f32, 2.0, 3.0, 4.0]);
        assert!(detail(read_array(&path).unwrap_err()).contains("Fortran order"));

        write_with_npyz(&path, "<f4", npyz::Order::C, &[4], &[1f32, 2.0, 3.0, 4.0]);
        let whole = std::fs::read(&path).unwrap();
        std::fs::write(&path, &whole[..whole.len() - 1]).unwrap();
        assert!(detail(read_array(&path).unwrap_err()).contains("truncated"));

        std::fs::write(&path, "a,b\n1,2\n").unwrap();
        let msg = detail(read_array(&path).unwrap_err());
        assert!(msg.starts_with("not a .npy file") && !msg.contains('\n'), "{msg}");
        assert!(detail(read_array(&dir.join("missing.npy")).unwrap_err()).starts_with("cannot read"));
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn masks_read_bool_and_uint8_and_ids_read_int32() {
        let dir = scratch("masks");
        let path = dir.join("m.npy");
        write_with_npyz(&path, "|b1", npyz::Order::C, &[2, 2], &[true, false, false, true]);
        assert_eq!(read_bools(&path).unwrap(), Array { shape: vec![2, 2], data: vec![true, false, false, true] });
        write_with_npyz(&path, "|u1", npyz::Order::C, &[3], &[0u8, 7, 1]);
        assert_eq!(read_bools(&path).unwrap().data, [false, true, true]);
        for descr in ["<i4", ">i4"] {
            write_with_npyz(&path, descr, npyz::Order::C, &[1, 3], &[0i32, -2, 70000]);
            assert_eq!(read_i32(&path).unwrap(), Array { shape: vec![1, 3], data: vec![0, -2, 70000] }, "{descr}");
        }
        write_with_npyz(&path, "<i8", npyz::Order::C, &[2], &[1i64, 2]);
        assert!(detail(read_bools(&path).unwrap_err()).contains("'<i8' is not supported: use bool or uint8"));
        assert!(detail(read_i32(&path).unwrap_err()).contains("'<i8' is not supported: use int32"));
        write_with_npyz(&path, "<f4", npyz::Order::C, &[2], &[1f32, 2.0]);
        assert!(detail(read_bools(&path).unwrap_err()).contains("'<f4' is not supported"));
        assert!(detail(read_lengths(&path).unwrap_err()).contains("'<f4' is not supported: use int32 or uint32"));
        assert!(detail(read_array(&dir.join("missing.npy")).unwrap_err()).starts_with("cannot read"));
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn lengths_read_int32_and_uint32_1d() {
        let dir = scratch("lengths");
        let path = dir.join("l.npy");
        write_with_npyz(&path, "<i4", npyz::Order::C, &[3], &[4i32, 0, 70000]);
        assert_eq!(read_lengths(&path).unwrap(), [4, 0, 70000]);
        write_with_npyz(&path, ">u4", npyz::Order::C, &[2], &[u32::MAX, 1]);
        assert_eq!(read_lengths(&path).unwrap(), [u32::MAX, 1]);
        write_with_npyz(&path, "<i4", npyz::Order::C, &[2], &[3i32, -1]);
        assert!(detail(read_lengths(&path).unwrap_err()).contains("length 1 is -1"));
        write_with_npyz(&path, "<i4", npyz::Order::C, &[1, 2], &[3i32, 1]);
        assert!(detail(read_lengths(&path).unwrap_err()).contains("lengths are 1-D"));
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn failed_write_keeps_the_old_file() {
        let dir = scratch("keep");
        let path = dir.join("o.npy");
        std::fs::write(&path, "old").unwrap();
        assert!(matches!(write_f32(&path, &[3], &[1.0, 2.0]), Err(Error::Shape(_))));
        let staged = stage_f32(&path, &[2], &[1.0, 2.0]).unwrap();
        drop(staged);
        assert_eq!(std::fs::read(&path).unwrap(), b"old");
        let names: Vec<_> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, ["o.npy"]);
        std::fs::remove_dir_all(dir).unwrap();
    }
}
