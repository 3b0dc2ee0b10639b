//! RDMA verbs, loaded at run time: `libibverbs.so.1` on Linux (rdma-core), `librdma.dylib` on
//! macOS 26.2+ (RDMA over Thunderbolt 5, a verbs-compatible API that lives only in the dyld
//! shared cache). The crate builds anywhere with no headers or C toolchain; a missing library,
//! a kernel without RDMA (`ibv_get_device_list` fails with ENOSYS here) and an absent device are
//! typed errors that the transport falls back from.
//!
//! - [`types`]: `repr(C)` types and integer-newtype enumerations, checked against the installed
//!   header by the layout tests where it is present.
//! - [`loader`]: the function table of the exported verbs.
//! - [`ops`]: the inline data-path verbs, through the provider's ops table.
//!
//! - [`safe`]: owned handles (children keep parents alive), GID scan, queue-pair transitions,
//!   memory-region and work-request budgets, checked completions.
//! - [`soft`]: a software verbs device with Apple's rules, used in place of a library in tests;
//!   its fabric reaches between threads and between processes of one host.

pub mod error;
pub mod loader;
pub mod ops;
pub mod safe;
pub mod soft;
pub mod types;

pub use error::{Error, Result};
pub use loader::{DeviceName, Verbs, VerbsTable};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_library_is_a_typed_error() {
        let err = Verbs::load_from("libsinew-no-such-verbs.so.9").unwrap_err();
        assert!(matches!(err, Error::LibraryMissing { .. }), "{err}");
    }

    #[test]
    fn the_device_list_on_this_machine_is_an_answer_never_a_crash() {
        // With libibverbs installed and no RDMA in the kernel (this project's CI), the list call
        // fails with ENOSYS: a clear error, and the NULL list is never freed. With a device it is
        // a list of names; without the library, a typed error.
        match Verbs::load() {
            Ok(v) => match v.device_names() {
                Ok(names) => eprintln!("RDMA devices: {names:?}"),
                Err(e @ Error::NoKernelSupport) => {
                    assert_eq!(
                        e.to_string(),
                        "no RDMA support in this kernel (ibv_get_device_list: ENOSYS)"
                    );
                    assert!(matches!(
                        v.require_device(None),
                        Err(Error::NoKernelSupport)
                    ));
                }
                Err(e) => panic!("unexpected error listing devices: {e}"),
            },
            Err(e) => {
                assert!(matches!(e, Error::LibraryMissing { .. }), "{e}");
                eprintln!("skipped the device list: {e}");
            }
        }
    }
}
