//! Loads the verbs library at run time into a function table, so this crate builds on any
//! machine (no headers, no C toolchain, no library) and "no library" is an error the transport
//! falls back from rather than a link failure.

use std::ffi::{CStr, c_char, c_int, c_void};

use libloading::Library;

use crate::error::{Error, Result};
use crate::types::*;

/// Where the verbs library is looked for, in order.
#[cfg(target_os = "macos")]
pub const LIBRARY_NAMES: &[&str] = &["/usr/lib/librdma.dylib", "librdma.dylib"];
/// Where the verbs library is looked for, in order.
#[cfg(not(target_os = "macos"))]
pub const LIBRARY_NAMES: &[&str] = &["libibverbs.so.1"];

macro_rules! verbs_table {
    ($($(#[$doc:meta])* $field:ident: $ty:ty = $symbol:literal;)*) => {
        /// The exported verbs functions. The data-path calls (`post_send`, `post_recv`,
        /// `poll_cq`, `req_notify_cq`) are not exported on either platform: see [`crate::ops`].
        pub struct VerbsTable {
            $($(#[$doc])* pub $field: $ty,)*
        }

        impl VerbsTable {
            fn resolve(lib: &Library, library: &str) -> Result<VerbsTable> {
                $(
                    // SAFETY: the symbol is a C function with this exact signature in every
                    // verbs implementation (rdma-core and Apple's, which mirrors its header).
                    let $field: $ty = unsafe {
                        *lib.get::<$ty>(concat!($symbol, "\0").as_bytes()).map_err(|e| Error::SymbolMissing {
                            library: library.to_string(),
                            symbol: $symbol,
                            reason: e.to_string(),
                        })?
                    };
                )*
                Ok(VerbsTable { $($field,)* })
            }
        }
    };
}

/// A verbs function table, resolved once from a loaded library (or the software device); its
/// functions are reached through `Deref` (`(verbs.open_device)(..)`).
pub struct Verbs {
    table: VerbsTable,
    library: String,
    // Keeps the library mapped while the table's pointers are in use (`None` for the software
    // device, whose functions are part of this crate).
    _lib: Option<Library>,
}

impl std::ops::Deref for Verbs {
    type Target = VerbsTable;

    fn deref(&self) -> &VerbsTable {
        &self.table
    }
}

verbs_table! {
    /// `ibv_get_device_list`.
    get_device_list: unsafe extern "C" fn(num_devices: *mut c_int) -> *mut *mut ibv_device = "ibv_get_device_list";
    /// `ibv_free_device_list`; never call it with NULL (rdma-core crashes).
    free_device_list: unsafe extern "C" fn(list: *mut *mut ibv_device) = "ibv_free_device_list";
    /// `ibv_get_device_name`.
    get_device_name: unsafe extern "C" fn(device: *mut ibv_device) -> *const c_char = "ibv_get_device_name";
    /// `ibv_open_device`.
    open_device: unsafe extern "C" fn(device: *mut ibv_device) -> *mut ibv_context = "ibv_open_device";
    /// `ibv_close_device`.
    close_device: unsafe extern "C" fn(context: *mut ibv_context) -> c_int = "ibv_close_device";
    /// `ibv_query_device`.
    query_device: unsafe extern "C" fn(context: *mut ibv_context, attr: *mut ibv_device_attr) -> c_int = "ibv_query_device";
    /// `ibv_query_port` (the exported compatibility entry point).
    query_port: unsafe extern "C" fn(context: *mut ibv_context, port: u8, attr: *mut ibv_port_attr) -> c_int = "ibv_query_port";
    /// `ibv_query_gid`.
    query_gid: unsafe extern "C" fn(context: *mut ibv_context, port: u8, index: c_int, gid: *mut ibv_gid) -> c_int = "ibv_query_gid";
    /// `ibv_alloc_pd`.
    alloc_pd: unsafe extern "C" fn(context: *mut ibv_context) -> *mut ibv_pd = "ibv_alloc_pd";
    /// `ibv_dealloc_pd`.
    dealloc_pd: unsafe extern "C" fn(pd: *mut ibv_pd) -> c_int = "ibv_dealloc_pd";
    /// `ibv_reg_mr`.
    reg_mr: unsafe extern "C" fn(pd: *mut ibv_pd, addr: *mut c_void, length: usize, access: c_int) -> *mut ibv_mr = "ibv_reg_mr";
    /// `ibv_dereg_mr`.
    dereg_mr: unsafe extern "C" fn(mr: *mut ibv_mr) -> c_int = "ibv_dereg_mr";
    /// `ibv_create_cq`.
    create_cq: unsafe extern "C" fn(context: *mut ibv_context, cqe: c_int, cq_context: *mut c_void, channel: *mut ibv_comp_channel, comp_vector: c_int) -> *mut ibv_cq = "ibv_create_cq";
    /// `ibv_destroy_cq`.
    destroy_cq: unsafe extern "C" fn(cq: *mut ibv_cq) -> c_int = "ibv_destroy_cq";
    /// `ibv_create_qp`.
    create_qp: unsafe extern "C" fn(pd: *mut ibv_pd, attr: *mut ibv_qp_init_attr) -> *mut ibv_qp = "ibv_create_qp";
    /// `ibv_destroy_qp`.
    destroy_qp: unsafe extern "C" fn(qp: *mut ibv_qp) -> c_int = "ibv_destroy_qp";
    /// `ibv_modify_qp`.
    modify_qp: unsafe extern "C" fn(qp: *mut ibv_qp, attr: *mut ibv_qp_attr, mask: c_int) -> c_int = "ibv_modify_qp";
}

impl Verbs {
    /// A table over functions of this crate (the software device), named `library`.
    pub(crate) fn from_table(table: VerbsTable, library: &str) -> Verbs {
        Verbs {
            table,
            library: library.to_string(),
            _lib: None,
        }
    }
}

impl std::fmt::Debug for Verbs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verbs")
            .field("library", &self.library)
            .finish_non_exhaustive()
    }
}

/// A device the library reports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceName(pub String);

impl Verbs {
    /// Loads the platform's verbs library ([`LIBRARY_NAMES`], in order).
    ///
    /// # Errors
    /// [`Error::LibraryMissing`] when none loads; [`Error::SymbolMissing`] when one lacks a
    /// function.
    pub fn load() -> Result<Verbs> {
        let mut last = String::new();
        for name in LIBRARY_NAMES {
            match Self::load_from(name) {
                Ok(v) => return Ok(v),
                Err(Error::LibraryMissing { reason, .. }) => last = reason,
                Err(e) => return Err(e),
            }
        }
        Err(Error::LibraryMissing {
            tried: LIBRARY_NAMES.join(", "),
            reason: last,
        })
    }

    /// Loads the verbs library at `path` (or by name, through the loader's search path).
    ///
    /// # Errors
    /// As [`Verbs::load`].
    pub fn load_from(path: &str) -> Result<Verbs> {
        // SAFETY: loading a verbs library runs its constructors, which only register providers;
        // this is what linking against it would do.
        let lib = unsafe { Library::new(path) }.map_err(|e| Error::LibraryMissing {
            tried: path.to_string(),
            reason: e.to_string(),
        })?;
        let table = VerbsTable::resolve(&lib, path)?;
        Ok(Verbs {
            table,
            library: path.to_string(),
            _lib: Some(lib),
        })
    }

    /// The library this table was loaded from.
    pub fn library(&self) -> &str {
        &self.library
    }

    /// The names of the RDMA devices present.
    ///
    /// # Errors
    /// [`Error::NoKernelSupport`] when the kernel has no RDMA support (the list call fails with
    /// ENOSYS); [`Error::Verb`] for any other failure. An empty list is `Ok` (see
    /// [`Verbs::require_device`]).
    pub fn device_names(&self) -> Result<Vec<DeviceName>> {
        let mut n: c_int = 0;
        // SAFETY: `n` is a valid out-pointer; the call allocates the list it returns.
        let list = unsafe { (self.get_device_list)(&mut n) };
        if list.is_null() {
            let e = std::io::Error::last_os_error();
            // NULL must never reach ibv_free_device_list: rdma-core dereferences it.
            return Err(match e.raw_os_error() {
                Some(libc::ENOSYS) => Error::NoKernelSupport,
                _ => Error::Verb {
                    verb: "ibv_get_device_list",
                    source: e,
                },
            });
        }
        let mut names = Vec::new();
        for i in 0..usize::try_from(n).unwrap_or(0) {
            // SAFETY: the list holds `n` valid device pointers (then a NULL).
            let dev = unsafe { *list.add(i) };
            if dev.is_null() {
                break;
            }
            // SAFETY: `dev` is a device of the list; the name is a NUL-terminated string owned
            // by the device, copied out before the list is freed.
            let name = unsafe { (self.get_device_name)(dev) };
            if !name.is_null() {
                // SAFETY: non-NULL, NUL-terminated (above).
                names.push(DeviceName(
                    unsafe { CStr::from_ptr(name) }
                        .to_string_lossy()
                        .into_owned(),
                ));
            }
        }
        // SAFETY: `list` is the non-NULL list returned above, freed once.
        unsafe { (self.free_device_list)(list) };
        Ok(names)
    }

    /// The named device, or the first one when `name` is `None`.
    ///
    /// # Errors
    /// As [`Verbs::device_names`], and [`Error::NoDevice`] when there is none (by that name).
    pub fn require_device(&self, name: Option<&str>) -> Result<DeviceName> {
        let names = self.device_names()?;
        let found = match name {
            Some(n) => names.into_iter().find(|d| d.0 == n),
            None => names.into_iter().next(),
        };
        found.ok_or_else(|| Error::NoDevice {
            name: name.map(str::to_string),
        })
    }
}
