//! What a node is: its memory, cores and CPU features, the model files it holds (by content hash,
//! cached so that a restart does not read a large file again), and where it caches what it is sent.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::UNIX_EPOCH;

use sha2::{Digest, Sha256};

use crate::error::{Error, Result};
use crate::wire::{Advert, Hash, ModelFile, PROTOCOL_VERSION, Rate};

/// The default cache directory: `$XDG_CACHE_HOME/sinew` (`~/.cache/sinew`).
pub fn default_cache_dir() -> PathBuf {
    dirs::cache_dir()
        .unwrap_or_else(std::env::temp_dir)
        .join("sinew")
}

/// Physical memory and memory available now, bytes, from `/proc/meminfo` (0 where unknown).
pub fn memory() -> (u64, u64) {
    let text = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map_or(0, |kb| kb * 1024)
    };
    (field("MemTotal:"), field("MemAvailable:"))
}

/// The CPU features the kernels care about, present on this machine.
pub fn cpu_features() -> String {
    let mut f: Vec<&str> = Vec::new();
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            f.push("avx512f");
        }
        if std::arch::is_x86_feature_detected!("avx512bw") {
            f.push("avx512bw");
        }
        if std::arch::is_x86_feature_detected!("avx2") {
            f.push("avx2");
        }
        if std::arch::is_x86_feature_detected!("fma") {
            f.push("fma");
        }
    }
    #[cfg(target_arch = "aarch64")]
    {
        f.push("neon");
    }
    f.join(" ")
}

/// This host's name.
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into())
}

/// Hex of a hash.
pub fn hex(h: &Hash) -> String {
    h.iter().map(|b| format!("{b:02x}")).collect()
}

/// The SHA-256 of `path`, remembered in `cache` (keyed by the path, size and modification time)
/// so that a large file is read once.
///
/// # Errors
/// I/O errors.
pub fn file_hash(path: &Path, cache: &Path) -> Result<ModelFile> {
    let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
    let mtime = meta
        .modified()
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_nanos());
    let abs = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    let key = {
        let mut h = Sha256::new();
        h.update(abs.to_string_lossy().as_bytes());
        h.update(meta.len().to_le_bytes());
        h.update(mtime.to_le_bytes());
        hex(&h.finalize().into())
    };
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let memo = cache.join("hashes").join(&key);
    if let Ok(text) = std::fs::read_to_string(&memo)
        && let Some(hash) = parse_hex(text.trim())
    {
        return Ok(ModelFile {
            name,
            size: meta.len(),
            hash,
        });
    }
    let hash = sha256_file(path)?;
    if std::fs::create_dir_all(cache.join("hashes")).is_ok() {
        let _ = std::fs::write(&memo, hex(&hash));
    }
    Ok(ModelFile {
        name,
        size: meta.len(),
        hash,
    })
}

/// The SHA-256 of a file's bytes.
///
/// # Errors
/// I/O errors.
pub fn sha256_file(path: &Path) -> Result<Hash> {
    let mut f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(|e| Error::io(path, e))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.finalize().into())
}

fn parse_hex(s: &str) -> Option<Hash> {
    if s.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, b) in out.iter_mut().enumerate() {
        *b = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

/// This node's advertisement: its resources and the model files given.
///
/// # Errors
/// I/O errors reading the model files.
pub fn advert(models: &[PathBuf], cache: &Path, cores: usize) -> Result<Advert> {
    let node_id = node_id(cache)?;
    let speed = speed_now();
    let (mem_total, mem_available) = memory();
    let files = models
        .iter()
        .map(|p| file_hash(p, cache))
        .collect::<Result<Vec<_>>>()?;
    Ok(Advert {
        version: protocol_version(),
        hostname: hostname(),
        mem_total,
        mem_available,
        cores: cores as u32,
        cpu_features: cpu_features(),
        files,
        node_id,
        speed,
    })
}

/// This node's stable id: 16 hex digits kept in `cache/node-id`, made at the first start. It
/// survives restarts; a copied cache directory copies it too, which the head detects (two live
/// nodes with one id are told apart by address and reported, never merged).
///
/// # Errors
/// The file cannot be read or written.
pub fn node_id(cache: &Path) -> Result<String> {
    let path = cache.join("node-id");
    if let Ok(text) = std::fs::read_to_string(&path) {
        let id = text.trim();
        if id.len() == 16 && id.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Ok(id.to_ascii_lowercase());
        }
        tracing::warn!(file = %path.display(), "the node id file is malformed; making a new id");
    }
    let mut b = [0u8; 8];
    getrandom::fill(&mut b).map_err(|e| Error::io(&path, std::io::Error::other(e.to_string())))?;
    let id: String = b.iter().map(|x| format!("{x:02x}")).collect();
    std::fs::create_dir_all(cache).map_err(|e| Error::io(cache, e))?;
    let part = path.with_extension("part");
    std::fs::write(&part, format!("{id}\n")).map_err(|e| Error::io(&part, e))?;
    std::fs::rename(&part, &path).map_err(|e| Error::io(&path, e))?;
    Ok(id)
}

/// Bytes of the matrices each format's rate is measured on: four times the last-level cache,
/// 64–256 MiB, so that the products stream from memory as a model's weights do (at 48 MiB on a
/// 32 MiB L3 the rates came out about a sixth above a model's). In a debug build, whose kernels
/// are no measure of anything, a small set that costs little.
fn speed_bytes() -> usize {
    if cfg!(debug_assertions) {
        return 2 << 20;
    }
    (4 * last_level_cache().unwrap_or(32 << 20)).clamp(64 << 20, 256 << 20)
}

/// The size of this CPU's largest cache, where the system says (Linux's sysfs).
fn last_level_cache() -> Option<usize> {
    let dir = std::fs::read_dir("/sys/devices/system/cpu/cpu0/cache").ok()?;
    dir.filter_map(|e| {
        let size = std::fs::read_to_string(e.ok()?.path().join("size")).ok()?;
        let size = size.trim();
        let (n, unit) = size.split_at(size.find(|c: char| !c.is_ascii_digit())?);
        let n: usize = n.parse().ok()?;
        match unit {
            "K" => Some(n << 10),
            "M" => Some(n << 20),
            _ => None,
        }
    })
    .max()
}

/// How long each format's products run.
const RATE_WINDOW: std::time::Duration =
    std::time::Duration::from_millis(if cfg!(debug_assertions) { 20 } else { 150 });

static SPEED: std::sync::OnceLock<Vec<Rate>> = std::sync::OnceLock::new();

/// Starts measuring this node's kernel rates ([`measure_speed`]) on a thread of its own, once
/// per process; [`speed_now`] and [`speed_wait`] read the result.
pub fn measure_speed_in_background() {
    static STARTED: std::sync::Once = std::sync::Once::new();
    STARTED.call_once(|| {
        let _ = std::thread::Builder::new()
            .name("sinew-speed".into())
            .spawn(|| {
                let rates = measure_speed();
                let text: Vec<String> = rates
                    .iter()
                    .map(|r| format!("{} {:.1} GB/s", r.format, r.bytes_per_s as f64 / 1e9))
                    .collect();
                tracing::info!(rates = %text.join(", "), "kernel rates measured");
                let _ = SPEED.set(rates);
            });
    });
}

/// The kernel rates if measured by now (empty if not yet).
pub fn speed_now() -> Vec<Rate> {
    SPEED.get().cloned().unwrap_or_default()
}

/// The kernel rates, measuring them first if no measurement has started, waiting at most
/// `timeout` for one under way (then empty).
pub fn speed_wait(timeout: std::time::Duration) -> Vec<Rate> {
    measure_speed_in_background();
    let end = std::time::Instant::now() + timeout;
    while std::time::Instant::now() < end {
        if let Some(s) = SPEED.get() {
            return s.clone();
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    Vec::new()
}

/// How fast this node's matrix-vector kernels stream each weight format (one activation row,
/// the process's compute threads, three matrices 768, 2048 and 4096 wide, four times the
/// last-level cache in all, 64–256 MiB): the memory bandwidth decode sees, capped by compute
/// where dequantizing costs more than reading.
/// The median of the products run over 150 ms per format (in a debug build, 2 MiB and 20 ms).
/// Formats the kernels do not run here are left out.
pub fn measure_speed() -> Vec<Rate> {
    use candle_core::quantized::GgmlDType as D;
    use engine::kernels::Format;
    // a decoder's mix of shapes: expert down projections (768 wide), the hidden width, and
    // attention outputs (4096 wide)
    let shapes = [768usize, 2048, 4096];
    let mut out = Vec::new();
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    for (dtype, name) in [
        (D::Q4K, "q4_k"),
        (D::Q6K, "q6_k"),
        (D::Q8_0, "q8_0"),
        (D::BF16, "bf16"),
        (D::F16, "f16"),
        (D::F32, "f32"),
    ] {
        let Some(f) = Format::of(dtype) else { continue };
        let mut mats = Vec::new();
        let mut total = 0usize;
        for cols in shapes {
            let row = f.row_bytes(cols);
            let rows = (speed_bytes() / shapes.len() / row).max(16) / 16 * 16;
            // a random 64 KiB pattern, repeated; finite scales and values: every 16-bit
            // half's exponent below all ones
            let mut pattern = vec![0u8; 64 << 10];
            for c in pattern.chunks_mut(8) {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                c.copy_from_slice(&(seed & 0x3fff_3fff_3fff_3fff).to_le_bytes());
            }
            let mut bytes = vec![0u8; rows * row];
            for c in bytes.chunks_mut(pattern.len()) {
                c.copy_from_slice(&pattern[..c.len()]);
            }
            let (Some(m), Ok(x)) = (
                engine::linear::Mat::from_blocks(dtype, &bytes, rows, cols),
                candle_core::Tensor::ones(
                    (1, cols),
                    candle_core::DType::F32,
                    &candle_core::Device::Cpu,
                ),
            ) else {
                continue;
            };
            total += rows * row;
            mats.push((m, x));
        }
        if mats.len() != shapes.len() {
            continue;
        }
        // sustained, not the luckiest moment: products for at least RATE_WINDOW (and 5),
        // the median of their times
        let mut times = Vec::new();
        let started = std::time::Instant::now();
        'reps: while times.len() < 5 || (started.elapsed() < RATE_WINDOW && times.len() < 1000) {
            let t = std::time::Instant::now();
            for (m, x) in &mats {
                if m.forward(x).is_err() {
                    times.clear();
                    break 'reps;
                }
            }
            times.push(t.elapsed().as_secs_f64());
        }
        times.sort_by(f64::total_cmp);
        let best = times.get(times.len() / 2).copied().unwrap_or(f64::MAX);
        if best < f64::MAX {
            out.push(Rate {
                format: name.into(),
                bytes_per_s: (total as f64 / best.max(1e-9)) as u64,
            });
        }
    }
    out
}

/// The protocol version this process speaks: [`PROTOCOL_VERSION`], unless the test-only
/// `SINEW_TEST_PROTOCOL_VERSION` says otherwise (how the tests make two versions meet).
pub fn protocol_version() -> u16 {
    std::env::var("SINEW_TEST_PROTOCOL_VERSION")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(PROTOCOL_VERSION)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashes_are_remembered_and_follow_the_content() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("m.gguf");
        std::fs::write(&f, b"one").unwrap();
        let a = file_hash(&f, dir.path()).unwrap();
        assert_eq!(a.hash, sha256_file(&f).unwrap());
        assert_eq!(file_hash(&f, dir.path()).unwrap(), a);
        std::thread::sleep(std::time::Duration::from_millis(20));
        std::fs::write(&f, b"two!").unwrap();
        let b = file_hash(&f, dir.path()).unwrap();
        assert_ne!(a.hash, b.hash);
        assert_eq!(b.size, 4);
        assert_eq!(parse_hex(&hex(&b.hash)), Some(b.hash));
    }

    #[test]
    fn the_node_id_is_kept_and_a_bad_one_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let a = node_id(dir.path()).unwrap();
        assert_eq!(a.len(), 16);
        assert_eq!(node_id(dir.path()).unwrap(), a);
        let other = tempfile::tempdir().unwrap();
        assert_ne!(node_id(other.path()).unwrap(), a);
        std::fs::write(dir.path().join("node-id"), "not an id").unwrap();
        let b = node_id(dir.path()).unwrap();
        assert_ne!(b, a);
        assert_eq!(node_id(dir.path()).unwrap(), b);
    }

    #[test]
    fn the_last_level_cache_is_read_where_the_system_says() {
        if std::path::Path::new("/sys/devices/system/cpu/cpu0/cache").exists() {
            let c = last_level_cache();
            assert!(c.is_some_and(|c| c >= 64 << 10), "{c:?}");
        }
        let set = speed_bytes();
        if cfg!(debug_assertions) {
            assert_eq!(set, 2 << 20);
        } else {
            assert!((64 << 20..=256 << 20).contains(&set), "{set}");
        }
    }

    #[test]
    fn speed_is_measured_for_the_formats_the_kernels_run() {
        let s = measure_speed();
        if engine::kernels::Format::Q4K.native() {
            assert!(
                s.iter().any(|r| r.format == "q4_k" && r.bytes_per_s > 0),
                "{s:?}"
            );
        }
    }
}
