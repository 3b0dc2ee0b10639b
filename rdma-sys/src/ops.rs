//! The data-path verbs. `ibv_post_send`, `ibv_post_recv`, `ibv_poll_cq` and `ibv_req_notify_cq`
//! are `static inline` in `<infiniband/verbs.h>` on both Linux and macOS: they call through the
//! provider's ops table in the context, and so must we.

use std::ffi::c_int;

use crate::types::*;

/// `ibv_post_send`: returns 0 or an errno; `bad_wr` points at the first request not posted.
///
/// # Safety
/// `qp` must be a live queue pair of a live context; `wr` a valid list whose SGEs point into
/// registered memory that stays valid until the sends complete.
pub unsafe fn post_send(
    qp: *mut ibv_qp,
    wr: *mut ibv_send_wr,
    bad_wr: *mut *mut ibv_send_wr,
) -> c_int {
    // SAFETY: the caller guarantees `qp` and its context are live.
    match unsafe { (*(*qp).context).ops.post_send } {
        // SAFETY: the provider's own implementation, called as the header's inline does.
        Some(f) => unsafe { f(qp, wr, bad_wr) },
        None => libc::EOPNOTSUPP,
    }
}

/// `ibv_post_recv`: returns 0 or an errno.
///
/// # Safety
/// As [`post_send`], for receive buffers.
pub unsafe fn post_recv(
    qp: *mut ibv_qp,
    wr: *mut ibv_recv_wr,
    bad_wr: *mut *mut ibv_recv_wr,
) -> c_int {
    // SAFETY: the caller guarantees `qp` and its context are live.
    match unsafe { (*(*qp).context).ops.post_recv } {
        // SAFETY: the provider's own implementation, called as the header's inline does.
        Some(f) => unsafe { f(qp, wr, bad_wr) },
        None => libc::EOPNOTSUPP,
    }
}

/// `ibv_poll_cq`: the number of completions written to `wc` (≤ `num_entries`), or negative on
/// error.
///
/// # Safety
/// `cq` must be a live completion queue of a live context; `wc` must have room for
/// `num_entries` completions.
pub unsafe fn poll_cq(cq: *mut ibv_cq, num_entries: c_int, wc: *mut ibv_wc) -> c_int {
    // SAFETY: the caller guarantees `cq` and its context are live.
    match unsafe { (*(*cq).context).ops.poll_cq } {
        // SAFETY: the provider's own implementation, called as the header's inline does.
        Some(f) => unsafe { f(cq, num_entries, wc) },
        None => -libc::EOPNOTSUPP,
    }
}

/// `ibv_req_notify_cq`: returns 0 or an errno.
///
/// # Safety
/// `cq` must be a live completion queue of a live context.
pub unsafe fn req_notify_cq(cq: *mut ibv_cq, solicited_only: c_int) -> c_int {
    // SAFETY: the caller guarantees `cq` and its context are live.
    match unsafe { (*(*cq).context).ops.req_notify_cq } {
        // SAFETY: the provider's own implementation, called as the header's inline does.
        Some(f) => unsafe { f(cq, solicited_only) },
        None => libc::EOPNOTSUPP,
    }
}
