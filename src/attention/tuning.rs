//! Tuned flash configurations: the cache file the tuner ([`crate::tune`], `wattn tune`)
//! writes, and [`FlashConfig::for_shape`], which looks a shape up there before falling back
//! to the adapter class's preset.
//!
//! The file is plain text, one configuration a line, tab-separated, under a line naming
//! its format:
//!
//! ```text
//! wattn-tuning 1
//! # adapter  backend  driver  wattn  d_qk  d_v  dtype  causal  config  seq  median_ms
//! llvmpipe (LLVM 15.0.6, 256 bits)  Vulkan  llvmpipe Mesa 22.3.6 (LLVM 15.0.6)  0.1.0  64  64  f32  false  32,4,4,4,1  1024  35.2
//! ```
//!
//! It is a cache: a file of another format, or a line that does not parse, is left out
//! (with a warning for the commands that show one), never an error. It is replaced whole
//! (a temporary file renamed over it), so a reader sees the old cache or the new one.

use super::AttentionShape;
use super::flash::{FlashConfig, HEAD_DIM_GRANULE};
use crate::context::Context;
use crate::dtype::DType;
use crate::error::{Error, Result};
use std::ffi::OsString;
use std::path::{Path, PathBuf};

/// The environment variable naming the cache file, in place of the platform's cache directory.
pub const CACHE_ENV: &str = "WATTN_TUNE_CACHE";

/// The first line of the files this version reads and writes.
const FORMAT: &str = "wattn-tuning 1";
/// The second line: the columns, for a person reading the file.
const COLUMNS: &str = "# adapter\tbackend\tdriver\twattn\td_qk\td_v\tdtype\tcausal\tconfig\tseq\tmedian_ms";

/// What a tuned configuration holds for: the adapter and driver it was measured on, the
/// wattn version (the kernels change between versions), the head-dim bucket, the dtype and
/// whether the mask is causal.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TuneKey {
    /// The adapter's name.
    pub adapter: String,
    /// Its backend, as wgpu names it ("Vulkan", "Metal", ...): one adapter may be reached
    /// through two.
    pub backend: String,
    /// The driver and its version (`driver` and `driver_info` of `wgpu::AdapterInfo`).
    pub driver: String,
    /// The wattn version that measured it.
    pub wattn_version: String,
    /// Dqk rounded up to [`HEAD_DIM_GRANULE`]: one compiled variant serves the bucket.
    pub d_qk: u32,
    /// Dv rounded up to [`HEAD_DIM_GRANULE`].
    pub d_v: u32,
    /// The storage dtype.
    pub dtype: DType,
    /// Causal or not (the kernel skips masked tiles, which changes the best tiles).
    pub causal: bool,
}

impl TuneKey {
    /// The key of head dims `d_qk` and `d_v` with `dtype` and `causal` on `ctx`'s adapter,
    /// for this version of wattn.
    pub fn new(ctx: &Context, d_qk: usize, d_v: usize, dtype: DType, causal: bool) -> Self {
        let info = ctx.adapter_info();
        let bucket = |d: usize| (d as u32).next_multiple_of(HEAD_DIM_GRANULE);
        Self {
            adapter: one_field(&info.name),
            backend: format!("{:?}", info.backend),
            driver: one_field(&format!("{} {}", info.driver, info.driver_info)),
            wattn_version: env!("CARGO_PKG_VERSION").into(),
            d_qk: bucket(d_qk),
            d_v: bucket(d_v),
            dtype,
            causal,
        }
    }

    /// The bucket in words: "f16 d128 causal", "f32 d192/128 dense".
    pub fn describe(&self) -> String {
        let dims = if self.d_qk == self.d_v { self.d_qk.to_string() } else { format!("{}/{}", self.d_qk, self.d_v) };
        format!("{} d{dims} {}", self.dtype, if self.causal { "causal" } else { "dense" })
    }
}

/// Text as one field of the file: runs of whitespace (tabs and line breaks separate fields
/// and entries) become one space.
fn one_field(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// One line of the cache: the configuration the tuner chose for a key.
#[derive(Clone, Debug, PartialEq)]
pub struct TunedEntry {
    /// What it holds for.
    pub key: TuneKey,
    /// The fastest configuration that passed the accuracy check.
    pub config: FlashConfig,
    /// The sequence length it was timed at.
    pub seq: usize,
    /// Its median time there, in milliseconds.
    pub median_ms: f64,
}

impl TunedEntry {
    fn line(&self) -> String {
        let k = &self.key;
        let fields = [
            k.adapter.clone(),
            k.backend.clone(),
            k.driver.clone(),
            k.wattn_version.clone(),
            k.d_qk.to_string(),
            k.d_v.to_string(),
            k.dtype.to_string(),
            k.causal.to_string(),
            self.config.to_string(),
            self.seq.to_string(),
            format!("{:.4}", self.median_ms),
        ];
        fields.join("\t")
    }

    fn parse(line: &str) -> std::result::Result<Self, String> {
        let fields: Vec<&str> = line.split('\t').collect();
        let [adapter, backend, driver, wattn_version, d_qk, d_v, dtype, causal, config, seq, median_ms] = fields[..]
        else {
            return Err(format!("{} fields, expected 11", fields.len()));
        };
        let number = |what: &str, text: &str| text.parse::<u32>().map_err(|e| format!("{what} '{text}': {e}"));
        let key = TuneKey {
            adapter: adapter.into(),
            backend: backend.into(),
            driver: driver.into(),
            wattn_version: wattn_version.into(),
            d_qk: number("d_qk", d_qk)?,
            d_v: number("d_v", d_v)?,
            dtype: dtype.parse().map_err(|e: Error| e.to_string())?,
            causal: causal.parse().map_err(|_| format!("causal '{causal}' is not true or false"))?,
        };
        Ok(Self {
            key,
            config: config.parse().map_err(|e: Error| e.to_string())?,
            seq: number("seq", seq)? as usize,
            median_ms: median_ms.parse().map_err(|e| format!("median_ms '{median_ms}': {e}"))?,
        })
    }
}

/// Where a configuration comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ConfigSource {
    /// Measured by the tuner on this adapter for this key, read from this cache file.
    Tuned(PathBuf),
    /// The preset of the adapter class ([`FlashConfig::for_adapter`]), by name: nothing is
    /// tuned for the key, or what is does not fit the shape.
    Preset(&'static str),
}

impl std::fmt::Display for ConfigSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ConfigSource::Tuned(path) => write!(f, "tuned, from {}", path.display()),
            ConfigSource::Preset(name) => write!(f, "preset {name}"),
        }
    }
}

/// The tuned configurations of one cache file, in memory.
#[derive(Clone, Debug)]
pub struct TuneCache {
    path: PathBuf,
    entries: Vec<TunedEntry>,
    warnings: Vec<String>,
}

impl TuneCache {
    /// The cache file: `$WATTN_TUNE_CACHE`, else `wattn/tuning` in the platform's cache
    /// directory (`$XDG_CACHE_HOME`, else `~/.cache` on Linux and other Unix systems,
    /// `~/Library/Caches` on macOS, `%LOCALAPPDATA%` on Windows); `None` when the
    /// environment names neither.
    pub fn default_path() -> Option<PathBuf> {
        cache_path(|name| std::env::var_os(name))
    }

    /// The cache at [`Self::default_path`], or `None` where there is none.
    pub fn load_default() -> Option<Self> {
        Self::default_path().map(|path| Self::load(&path))
    }

    /// The cache at `path`. A missing file is an empty cache. An unreadable file, one of
    /// another format and each line that does not parse are left out and described in
    /// [`Self::warnings`].
    pub fn load(path: &Path) -> Self {
        let mut cache = Self { path: path.to_path_buf(), entries: Vec::new(), warnings: Vec::new() };
        let text = match std::fs::read(path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return cache,
            Err(e) => {
                cache.warn(format!("cannot read it ({e}); ignored"));
                return cache;
            }
        };
        let Ok(text) = String::from_utf8(text) else {
            cache.warn(format!("is not a {FORMAT} file (not text); ignored"));
            return cache;
        };
        let mut lines = text.lines().enumerate();
        match lines.next() {
            Some((_, first)) if first.trim_end() == FORMAT => {}
            first => {
                let begins = first.map_or("", |(_, l)| l).chars().take(40).collect::<String>();
                cache.warn(format!("is not a {FORMAT} file (it begins '{begins}'); ignored"));
                return cache;
            }
        }
        for (index, line) in lines {
            if line.trim().is_empty() || line.starts_with('#') {
                continue;
            }
            match TunedEntry::parse(line.trim_end_matches('\r')) {
                Ok(entry) => cache.insert(entry),
                Err(why) => cache.warn(format!("line {} skipped: {why}", index + 1)),
            }
        }
        cache
    }

    fn warn(&mut self, what: String) {
        self.warnings.push(format!("tuning cache {}: {what}", self.path.display()));
    }

    /// The file this cache is read from and saved to.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Every entry, of every adapter and version the file holds.
    pub fn entries(&self) -> &[TunedEntry] {
        &self.entries
    }

    /// What was left out of the file when it was loaded, one sentence each.
    pub fn warnings(&self) -> &[String] {
        &self.warnings
    }

    /// The entry for `key`, if one was tuned.
    pub fn get(&self, key: &TuneKey) -> Option<&TunedEntry> {
        self.entries.iter().find(|e| e.key == *key)
    }

    /// Adds `entry`, replacing the one with the same key.
    pub fn insert(&mut self, entry: TunedEntry) {
        match self.entries.iter_mut().find(|e| e.key == entry.key) {
            Some(old) => *old = entry,
            None => self.entries.push(entry),
        }
    }

    /// Writes the cache to [`Self::path`], creating its directory: under a temporary name
    /// beside it, then renamed over it in one step.
    pub fn save(&self) -> Result<()> {
        let fail = |detail: String| Error::File { path: self.path.clone(), detail };
        let name = self.path.file_name().ok_or_else(|| fail("is not a file name".into()))?;
        if let Some(dir) = self.path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| fail(format!("cannot create {}: {e}", dir.display())))?;
        }
        let mut text = format!("{FORMAT}\n{COLUMNS}\n");
        for entry in &self.entries {
            text += &entry.line();
            text.push('\n');
        }
        let mut temp_name = OsString::from(".");
        temp_name.push(name);
        temp_name.push(format!(".{}.tmp", std::process::id()));
        let temp = self.path.with_file_name(temp_name);
        let written = std::fs::write(&temp, text).and_then(|()| std::fs::rename(&temp, &self.path));
        written.map_err(|e| {
            let _ = std::fs::remove_file(&temp);
            fail(format!("cannot write: {e}"))
        })
    }

    /// The configuration for `shape`, `dtype` and `causal` on `ctx`: the tuned one where this
    /// cache has it and it fits the shape and the device's limits, else the preset.
    pub fn choose(
        &self,
        ctx: &Context,
        shape: &AttentionShape,
        dtype: DType,
        causal: bool,
    ) -> (FlashConfig, ConfigSource) {
        let key = TuneKey::new(ctx, shape.d_qk, shape.d_v, dtype, causal);
        match self.get(&key) {
            Some(entry) if entry.config.check(ctx.limits(), shape).is_ok() => {
                (entry.config, ConfigSource::Tuned(self.path.clone()))
            }
            _ => FlashConfig::fitted_preset(ctx, shape),
        }
    }
}

impl FlashConfig {
    /// [`Self::for_adapter`]'s preset, with its name.
    pub fn preset_for(ctx: &Context) -> (Self, ConfigSource) {
        let config = Self::for_adapter(ctx);
        let name = Self::PRESETS.iter().find(|(_, p)| *p == config).map_or("for the adapter", |(name, _)| name);
        (config, ConfigSource::Preset(name))
    }

    /// [`Self::preset_for`]'s preset [`fitted`](Self::fitted) to `shape`.
    fn fitted_preset(ctx: &Context, shape: &AttentionShape) -> (Self, ConfigSource) {
        let (preset, source) = Self::preset_for(ctx);
        (preset.fitted(ctx.limits(), shape), source)
    }

    /// The configuration to run `shape` with `dtype` (causal or not) on `ctx`: the one the
    /// tuner saved for this adapter, driver, wattn version and head-dim bucket in the cache
    /// ([`TuneCache::default_path`]) when it fits the shape, else [`Self::for_adapter`]'s
    /// preset; with where it came from. The file, a few lines, is read at each call.
    pub fn for_shape(ctx: &Context, shape: &AttentionShape, dtype: DType, causal: bool) -> (Self, ConfigSource) {
        match TuneCache::load_default() {
            Some(cache) => cache.choose(ctx, shape, dtype, causal),
            None => Self::fitted_preset(ctx, shape),
        }
    }
}

/// [`TuneCache::default_path`] with the environment read through `var`.
fn cache_path(var: impl Fn(&str) -> Option<OsString>) -> Option<PathBuf> {
    let dir = |name: &str| var(name).filter(|v| !v.is_empty()).map(PathBuf::from);
    if let Some(file) = dir(CACHE_ENV) {
        return Some(file);
    }
    let cache_dir = if cfg!(windows) {
        dir("LOCALAPPDATA")
    } else if cfg!(target_os = "macos") {
        dir("HOME").map(|home| home.join("Library/Caches"))
    } else {
        // The XDG base-directory rule: a relative path is invalid and ignored.
        dir("XDG_CACHE_HOME").filter(|p| p.is_absolute()).or_else(|| dir("HOME").map(|home| home.join(".cache")))
    };
    cache_dir.map(|d| d.join("wattn").join("tuning"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(adapter: &str, wattn_version: &str, dtype: DType, causal: bool) -> TuneKey {
        TuneKey {
            adapter: adapter.into(),
            backend: "Vulkan".into(),
            driver: "Mesa 25.0 (LLVM 19)".into(),
            wattn_version: wattn_version.into(),
            d_qk: 64,
            d_v: 64,
            dtype,
            causal,
        }
    }

    fn entry(key: TuneKey, config: FlashConfig) -> TunedEntry {
        TunedEntry { key, config, seq: 1024, median_ms: 12.5 }
    }

    /// A file of its own in a directory of its own, removed at the end of the test.
    struct Scratch(PathBuf);

    impl Scratch {
        fn new(name: &str) -> Self {
            let dir = std::env::temp_dir().join(format!("wattn-tuning-{name}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            Self(dir)
        }
        fn file(&self) -> PathBuf {
            self.0.join("sub").join("tuning")
        }
        fn write(&self, bytes: &[u8]) -> PathBuf {
            std::fs::create_dir_all(self.file().parent().unwrap()).unwrap();
            std::fs::write(self.file(), bytes).unwrap();
            self.file()
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn entries_round_trip_through_the_file() {
        let scratch = Scratch::new("round-trip");
        let mut cache = TuneCache::load(&scratch.file());
        assert!(cache.entries().is_empty() && cache.warnings().is_empty(), "a missing file is an empty cache");
        let f16 = entry(key("NVIDIA H200, 141 GB", "0.1.0", DType::F16, true), FlashConfig::GPU);
        let f32 = entry(key("llvmpipe (LLVM 19.1.7, 256 bits)", "0.1.0", DType::F32, false), FlashConfig::CPU);
        cache.insert(f16.clone());
        cache.insert(f32.clone());
        cache.save().unwrap();
        let loaded = TuneCache::load(&scratch.file());
        assert_eq!(loaded.entries(), &[f16.clone(), f32.clone()]);
        assert!(loaded.warnings().is_empty(), "{:?}", loaded.warnings());
        // Saving replaces the entry of the same key and leaves no temporary file behind.
        let mut cache = loaded;
        cache.insert(TunedEntry { median_ms: 3.25, ..entry(f16.key.clone(), FlashConfig::PORTABLE) });
        cache.save().unwrap();
        let loaded = TuneCache::load(&scratch.file());
        assert_eq!(loaded.entries().len(), 2);
        assert_eq!(loaded.get(&f16.key).map(|e| (e.config, e.median_ms)), Some((FlashConfig::PORTABLE, 3.25)));
        let names: Vec<_> =
            std::fs::read_dir(scratch.file().parent().unwrap()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, ["tuning"]);
    }

    #[test]
    fn a_file_of_another_format_is_ignored_with_a_warning() {
        let scratch = Scratch::new("foreign");
        let line = entry(key("gpu", "0.1.0", DType::F32, false), FlashConfig::GPU).line();
        for text in [format!("wattn-tuning 2\n{line}\n"), format!("{line}\n"), String::new()] {
            let cache = TuneCache::load(&scratch.write(text.as_bytes()));
            assert!(cache.entries().is_empty(), "{text}");
            assert_eq!(cache.warnings().len(), 1, "{text}");
            assert!(cache.warnings()[0].contains("is not a wattn-tuning 1 file"), "{:?}", cache.warnings());
        }
        let cache = TuneCache::load(&scratch.write(&[0xff, 0xfe, 0x00, 0x80]));
        assert!(cache.entries().is_empty() && cache.warnings()[0].contains("not text"), "{:?}", cache.warnings());
    }

    #[test]
    fn lines_that_do_not_parse_are_skipped_and_the_rest_kept() {
        let scratch = Scratch::new("corrupt");
        let good = entry(key("gpu", "0.1.0", DType::F16, false), FlashConfig::GPU);
        let other_version = entry(key("gpu", "0.0.9", DType::F16, false), FlashConfig::CPU);
        let text = [
            FORMAT.to_string(),
            "# a comment".into(),
            good.line(),
            "truncated\tline".into(),
            good.line().replace("32,8,4,4,1", "32,8,four,4,1"),
            good.line().replace("\tf16\t", "\tbf16\t"),
            good.line().replace("\tfalse\t", "\tmaybe\t"),
            String::new(),
            other_version.line(),
        ]
        .join("\n");
        let cache = TuneCache::load(&scratch.write(text.as_bytes()));
        assert_eq!(cache.entries(), &[good.clone(), other_version.clone()]);
        let skipped: Vec<&str> = cache.warnings().iter().map(|w| w.split(": ").nth(1).unwrap()).collect();
        assert_eq!(
            skipped,
            ["line 4 skipped", "line 5 skipped", "line 6 skipped", "line 7 skipped"],
            "{:?}",
            cache.warnings()
        );
        // An entry of another wattn version is kept in the file but is another key.
        assert_eq!(cache.get(&good.key).unwrap().config, FlashConfig::GPU);
        assert_ne!(good.key, other_version.key);
    }

    #[test]
    fn fields_cannot_break_the_line_format() {
        assert_eq!(one_field(" NVIDIA\tH200\n(rev 2)  "), "NVIDIA H200 (rev 2)");
        let described = key("x", "0.1.0", DType::F16, true).describe();
        assert_eq!(described, "f16 d64 causal");
        assert_eq!(
            TuneKey { d_v: 128, d_qk: 192, ..key("x", "0.1.0", DType::F32, false) }.describe(),
            "f32 d192/128 dense"
        );
    }

    #[test]
    fn the_path_follows_the_environment() {
        let env = |vars: &'static [(&'static str, &'static str)]| {
            move |name: &str| vars.iter().find(|(n, _)| *n == name).map(|(_, v)| OsString::from(v))
        };
        assert_eq!(cache_path(env(&[(CACHE_ENV, "/tmp/t"), ("HOME", "/home/a")])), Some(PathBuf::from("/tmp/t")));
        assert_eq!(cache_path(env(&[])), None);
        if cfg!(all(unix, not(target_os = "macos"))) {
            let home = PathBuf::from("/home/a/.cache/wattn/tuning");
            assert_eq!(cache_path(env(&[("HOME", "/home/a")])), Some(home.clone()));
            assert_eq!(cache_path(env(&[("HOME", "/home/a"), ("XDG_CACHE_HOME", "rel")])), Some(home));
            let xdg = env(&[("HOME", "/home/a"), ("XDG_CACHE_HOME", "/c"), (CACHE_ENV, "")]);
            assert_eq!(cache_path(xdg), Some(PathBuf::from("/c/wattn/tuning")));
        }
    }
}
