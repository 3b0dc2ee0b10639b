//! What a node is: its memory, cores and CPU features, the model files it holds (by content hash,
//! cached so that a restart does not read a large file again), and where it caches what it is sent.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::UNIX_EPOCH;

use sha2::{Digest, Sha256};

use crate::error::{Error, Result};
use crate::speed::speed_now;
use crate::wire::{Advert, Hash, ModelFile, PROTOCOL_VERSION};

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
}
