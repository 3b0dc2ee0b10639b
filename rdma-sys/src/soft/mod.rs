//! A software verbs device that behaves like Apple's Thunderbolt provider, so the RDMA code runs
//! without hardware: [`Verbs::software`] is a function table of the same type as a loaded
//! library's, and its contexts carry an ops table the inline data-path calls go through.
//!
//! Apple's rules, enforced: unreliable connections only (RC and UD are refused), SEND only, one
//! SGE, at most [`MAX_QP`] queue pairs and [`MAX_MR`] memory regions per context, at most
//! [`MAX_WR`] outstanding work requests per queue, messages up to [`MAX_MESSAGE`] bytes, and a
//! send delivered only into a receive spanning the same number of 4 KiB frames — a mismatched
//! send is dropped silently, and a send to a dead peer completes successfully (no
//! acknowledgement exists). Queue depth counts 4 KiB frames, as on Apple's provider.
//!
//! Each opened context is a node of its own, with a random IPv4-mapped link-local GID
//! (`::ffff:169.254.a.b`); queue pairs reach each other through the `fabric` module — between threads
//! of one process and between processes of one host (network namespace) alike.

mod fabric;

use std::collections::{HashMap, VecDeque};
use std::ffi::{CStr, c_char, c_int, c_void};
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};

use nix::errno::Errno;

use crate::loader::{Verbs, VerbsTable};
use crate::types::*;

/// A receive and its matching send span the same number of these.
pub const FRAME: usize = 4096;
/// The largest message: 4095 frames.
pub const MAX_MESSAGE: usize = 4095 * FRAME;
/// Outstanding work requests per queue.
pub const MAX_WR: usize = 4095;
/// Memory regions per context.
pub const MAX_MR: usize = 100;
/// Queue pairs per context.
pub const MAX_QP: usize = 10;

const NAME: &CStr = c"softrdma0";

fn frames(len: usize) -> usize {
    len.div_ceil(FRAME).max(1)
}

/// The one device object; only its address matters.
static DEVICE: u8 = 0;

fn device_ptr() -> *mut ibv_device {
    &DEVICE as *const u8 as *mut ibv_device
}

type QpKey = ([u8; 16], u32);

fn registry() -> &'static Mutex<HashMap<QpKey, Weak<QpShared>>> {
    static REGISTRY: OnceLock<Mutex<HashMap<QpKey, Weak<QpShared>>>> = OnceLock::new();
    REGISTRY.get_or_init(|| Mutex::new(HashMap::new()))
}

static NEXT_QPN: AtomicU32 = AtomicU32::new(0x100);

fn fail<T>(errno: i32, value: T) -> T {
    Errno::set_raw(errno);
    value
}

#[repr(C)]
struct SoftContext {
    ctx: ibv_context,
    node: fabric::Node,
    gid_v4: [u8; 16],
    gid_link_local: [u8; 16],
    /// Registered regions: (lkey, start, length).
    mrs: Mutex<Vec<(u32, usize, usize)>>,
    qps: Mutex<usize>,
    next_key: AtomicU32,
}

impl SoftContext {
    /// Whether `[addr, addr + len)` lies in a region registered under `lkey`.
    fn covers(&self, lkey: u32, addr: u64, len: usize) -> bool {
        let mrs = self.mrs.lock().unwrap_or_else(|e| e.into_inner());
        mrs.iter().any(|&(k, start, length)| {
            k == lkey
                && addr as usize >= start
                && (addr as usize).saturating_add(len) <= start + length
        })
    }
}

#[repr(C)]
struct SoftPd {
    pd: ibv_pd,
}

#[repr(C)]
struct SoftMr {
    mr: ibv_mr,
}

struct Completion {
    wc: ibv_wc,
    /// The queue pair whose outstanding send frames the completion releases.
    qp: Weak<QpShared>,
    /// Send frames released when polled (0 for receives, released at delivery).
    frames: usize,
}

#[repr(C)]
struct SoftCq {
    cq: ibv_cq,
    entries: Mutex<VecDeque<Completion>>,
}

struct Recv {
    wr_id: u64,
    addr: u64,
    len: usize,
}

struct QpState {
    state: ibv_qp_state,
    dest: Option<QpKey>,
    recvs: VecDeque<Recv>,
    /// Frames of the posted receives.
    recv_frames: usize,
    max_recv: usize,
    /// Set (under this lock) by `destroy_qp`: no delivery touches the queue pair afterwards.
    destroyed: bool,
}

struct QpShared {
    key: QpKey,
    ctx: *mut SoftContext,
    send_cq: *mut SoftCq,
    recv_cq: *mut SoftCq,
    sig_all: bool,
    /// Frames of sends posted and not yet completed (polled).
    sends_outstanding: AtomicUsize,
    max_send: usize,
    wire: Mutex<fabric::Wire>,
    st: Mutex<QpState>,
}

// SAFETY: the raw pointers designate the context and completion queues, which the verbs contract
// keeps alive while a queue pair using them exists; all mutable state is behind mutexes.
unsafe impl Send for QpShared {}
// SAFETY: as above.
unsafe impl Sync for QpShared {}

#[repr(C)]
struct SoftQp {
    qp: ibv_qp,
    shared: Arc<QpShared>,
}

impl SoftCq {
    fn push(&self, c: Completion) {
        self.entries
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push_back(c);
    }
}

unsafe extern "C" fn get_device_list(num: *mut c_int) -> *mut *mut ibv_device {
    if !num.is_null() {
        // SAFETY: the caller passes a valid out-pointer or NULL.
        unsafe { *num = 1 };
    }
    Box::into_raw(Box::new([device_ptr(), std::ptr::null_mut()])).cast()
}

unsafe extern "C" fn free_device_list(list: *mut *mut ibv_device) {
    if !list.is_null() {
        // SAFETY: `list` came from `get_device_list`'s Box of two pointers.
        drop(unsafe { Box::from_raw(list.cast::<[*mut ibv_device; 2]>()) });
    }
}

unsafe extern "C" fn get_device_name(_device: *mut ibv_device) -> *const c_char {
    NAME.as_ptr()
}

fn ops() -> ibv_context_ops {
    // SAFETY: an all-NULL function-pointer table is valid (`Option<fn>` is nullable).
    let mut ops: ibv_context_ops = unsafe { std::mem::zeroed() };
    ops.poll_cq = Some(poll_cq);
    ops.req_notify_cq = Some(req_notify_cq);
    ops.post_send = Some(post_send);
    ops.post_recv = Some(post_recv);
    ops
}

unsafe extern "C" fn open_device(device: *mut ibv_device) -> *mut ibv_context {
    if device != device_ptr() {
        return fail(libc::ENODEV, std::ptr::null_mut());
    }
    let node = match fabric::Node::bind(deliver) {
        Ok(node) => node,
        Err(e) => return fail(e.raw_os_error().unwrap_or(libc::EIO), std::ptr::null_mut()),
    };
    let gid_v4 = node.gid();
    let mut gid_link_local = [0u8; 16];
    gid_link_local[0] = 0xfe;
    gid_link_local[1] = 0x80;
    gid_link_local[12..16].copy_from_slice(&gid_v4[12..16]);
    let ctx = Box::new(SoftContext {
        ctx: ibv_context { device, ops: ops() },
        node,
        gid_v4,
        gid_link_local,
        mrs: Mutex::new(Vec::new()),
        qps: Mutex::new(0),
        next_key: AtomicU32::new(1),
    });
    Box::into_raw(ctx).cast()
}

unsafe extern "C" fn close_device(context: *mut ibv_context) -> c_int {
    if context.is_null() {
        return libc::EINVAL;
    }
    // SAFETY: `context` came from `open_device` and is closed once.
    drop(unsafe { Box::from_raw(context.cast::<SoftContext>()) });
    0
}

unsafe extern "C" fn query_device(_context: *mut ibv_context, attr: *mut ibv_device_attr) -> c_int {
    if attr.is_null() {
        return libc::EINVAL;
    }
    // SAFETY: all-zero is a valid `ibv_device_attr` (integers and a byte array).
    let mut a: ibv_device_attr = unsafe { std::mem::zeroed() };
    a.fw_ver[..10].copy_from_slice(b"sinew-soft");
    a.max_qp = MAX_QP as c_int;
    a.max_qp_wr = MAX_WR as c_int;
    a.max_sge = 1;
    a.max_cq = 64;
    a.max_cqe = 65536;
    a.max_mr = MAX_MR as c_int;
    a.max_pd = 16;
    a.max_mr_size = MAX_MESSAGE as u64;
    a.phys_port_cnt = 1;
    // SAFETY: `attr` is a valid out-pointer (checked non-NULL).
    unsafe { *attr = a };
    0
}

unsafe extern "C" fn query_port(
    _context: *mut ibv_context,
    port: u8,
    attr: *mut ibv_port_attr,
) -> c_int {
    if port != 1 || attr.is_null() {
        return libc::EINVAL;
    }
    let a = ibv_port_attr {
        state: ibv_port_state::ACTIVE,
        max_mtu: ibv_mtu::MTU_4096,
        active_mtu: ibv_mtu::MTU_4096,
        gid_tbl_len: 2,
        max_msg_sz: MAX_MESSAGE as u32,
        link_layer: ibv_link_layer::THUNDERBOLT,
        ..Default::default()
    };
    // SAFETY: `attr` is a valid out-pointer (checked non-NULL).
    unsafe { *attr = a };
    0
}

unsafe extern "C" fn query_gid(
    context: *mut ibv_context,
    port: u8,
    index: c_int,
    gid: *mut ibv_gid,
) -> c_int {
    if context.is_null() || gid.is_null() || port != 1 {
        return libc::EINVAL;
    }
    // SAFETY: `context` came from `open_device`.
    let ctx = unsafe { &*context.cast::<SoftContext>() };
    let raw = match index {
        0 => ctx.gid_link_local,
        1 => ctx.gid_v4,
        _ => return libc::EINVAL,
    };
    // SAFETY: `gid` is a valid out-pointer (checked non-NULL).
    unsafe { *gid = ibv_gid { raw } };
    0
}

unsafe extern "C" fn alloc_pd(context: *mut ibv_context) -> *mut ibv_pd {
    if context.is_null() {
        return fail(libc::EINVAL, std::ptr::null_mut());
    }
    Box::into_raw(Box::new(SoftPd {
        pd: ibv_pd { context, handle: 0 },
    }))
    .cast()
}

unsafe extern "C" fn dealloc_pd(pd: *mut ibv_pd) -> c_int {
    if pd.is_null() {
        return libc::EINVAL;
    }
    // SAFETY: `pd` came from `alloc_pd` and is freed once.
    drop(unsafe { Box::from_raw(pd.cast::<SoftPd>()) });
    0
}

unsafe extern "C" fn reg_mr(
    pd: *mut ibv_pd,
    addr: *mut c_void,
    length: usize,
    _access: c_int,
) -> *mut ibv_mr {
    if pd.is_null() || addr.is_null() {
        return fail(libc::EINVAL, std::ptr::null_mut());
    }
    // SAFETY: `pd` came from `alloc_pd`, its context from `open_device`.
    let context = unsafe { (*pd).context };
    // SAFETY: as above.
    let ctx = unsafe { &*context.cast::<SoftContext>() };
    let mut mrs = ctx.mrs.lock().unwrap_or_else(|e| e.into_inner());
    if mrs.len() >= MAX_MR {
        return fail(libc::ENOMEM, std::ptr::null_mut());
    }
    let key = ctx.next_key.fetch_add(1, Ordering::Relaxed);
    mrs.push((key, addr as usize, length));
    Box::into_raw(Box::new(SoftMr {
        mr: ibv_mr {
            context,
            pd,
            addr,
            length,
            handle: key,
            lkey: key,
            rkey: key,
        },
    }))
    .cast()
}

unsafe extern "C" fn dereg_mr(mr: *mut ibv_mr) -> c_int {
    if mr.is_null() {
        return libc::EINVAL;
    }
    // SAFETY: `mr` came from `reg_mr` and is freed once; its context is alive.
    let mr = unsafe { Box::from_raw(mr.cast::<SoftMr>()) };
    // SAFETY: as above.
    let ctx = unsafe { &*mr.mr.context.cast::<SoftContext>() };
    ctx.mrs
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .retain(|&(k, _, _)| k != mr.mr.lkey);
    0
}

unsafe extern "C" fn create_cq(
    context: *mut ibv_context,
    cqe: c_int,
    cq_context: *mut c_void,
    channel: *mut ibv_comp_channel,
    _comp_vector: c_int,
) -> *mut ibv_cq {
    if context.is_null() || cqe <= 0 {
        return fail(libc::EINVAL, std::ptr::null_mut());
    }
    Box::into_raw(Box::new(SoftCq {
        cq: ibv_cq {
            context,
            channel,
            cq_context,
            handle: 0,
            cqe,
        },
        entries: Mutex::new(VecDeque::new()),
    }))
    .cast()
}

unsafe extern "C" fn destroy_cq(cq: *mut ibv_cq) -> c_int {
    if cq.is_null() {
        return libc::EINVAL;
    }
    // SAFETY: `cq` came from `create_cq` and is freed once (after its queue pairs).
    drop(unsafe { Box::from_raw(cq.cast::<SoftCq>()) });
    0
}

unsafe extern "C" fn create_qp(pd: *mut ibv_pd, attr: *mut ibv_qp_init_attr) -> *mut ibv_qp {
    if pd.is_null() || attr.is_null() {
        return fail(libc::EINVAL, std::ptr::null_mut());
    }
    // SAFETY: valid pointers from the caller (checked non-NULL).
    let (a, context) = unsafe { (*attr, (*pd).context) };
    if a.qp_type != ibv_qp_type::UC
        || a.cap.max_send_sge > 1
        || a.cap.max_recv_sge > 1
        || a.cap.max_send_wr as usize > MAX_WR
        || a.cap.max_recv_wr as usize > MAX_WR
        || a.send_cq.is_null()
        || a.recv_cq.is_null()
    {
        return fail(libc::EINVAL, std::ptr::null_mut());
    }
    // SAFETY: the context came from `open_device`.
    let ctx = unsafe { &*context.cast::<SoftContext>() };
    let mut qps = ctx.qps.lock().unwrap_or_else(|e| e.into_inner());
    if *qps >= MAX_QP {
        return fail(libc::ENOMEM, std::ptr::null_mut());
    }
    *qps += 1;
    let qpn = NEXT_QPN.fetch_add(1, Ordering::Relaxed);
    let shared = Arc::new(QpShared {
        key: (ctx.gid_v4, qpn),
        ctx: context.cast(),
        send_cq: a.send_cq.cast(),
        recv_cq: a.recv_cq.cast(),
        sig_all: a.sq_sig_all != 0,
        sends_outstanding: AtomicUsize::new(0),
        max_send: (a.cap.max_send_wr as usize).clamp(1, MAX_WR),
        wire: Mutex::new(fabric::Wire::default()),
        st: Mutex::new(QpState {
            state: ibv_qp_state::RESET,
            dest: None,
            recvs: VecDeque::new(),
            recv_frames: 0,
            max_recv: (a.cap.max_recv_wr as usize).clamp(1, MAX_WR),
            destroyed: false,
        }),
    });
    registry()
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(shared.key, Arc::downgrade(&shared));
    Box::into_raw(Box::new(SoftQp {
        qp: ibv_qp {
            context,
            qp_context: a.qp_context,
            pd,
            send_cq: a.send_cq,
            recv_cq: a.recv_cq,
            srq: std::ptr::null_mut(),
            handle: qpn,
            qp_num: qpn,
            state: ibv_qp_state::RESET,
            qp_type: ibv_qp_type::UC,
        },
        shared,
    }))
    .cast()
}

unsafe extern "C" fn destroy_qp(qp: *mut ibv_qp) -> c_int {
    if qp.is_null() {
        return libc::EINVAL;
    }
    // SAFETY: `qp` came from `create_qp` and is freed once.
    let qp = unsafe { Box::from_raw(qp.cast::<SoftQp>()) };
    {
        let mut st = qp.shared.st.lock().unwrap_or_else(|e| e.into_inner());
        st.destroyed = true;
        st.recvs.clear();
    }
    registry()
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .remove(&qp.shared.key);
    // SAFETY: the context outlives its queue pairs (verbs contract).
    let ctx = unsafe { &*qp.shared.ctx };
    *ctx.qps.lock().unwrap_or_else(|e| e.into_inner()) -= 1;
    0
}

unsafe extern "C" fn modify_qp(qp: *mut ibv_qp, attr: *mut ibv_qp_attr, mask: c_int) -> c_int {
    if qp.is_null() || attr.is_null() || mask & qp_attr_mask::STATE == 0 {
        return libc::EINVAL;
    }
    // SAFETY: valid pointers from the caller (checked non-NULL).
    let (soft, a) = unsafe { (&mut *qp.cast::<SoftQp>(), *attr) };
    let mut st = soft.shared.st.lock().unwrap_or_else(|e| e.into_inner());
    let next = a.qp_state;
    let ok = match (st.state, next) {
        (_, ibv_qp_state::RESET) | (_, ibv_qp_state::ERR) => true,
        (ibv_qp_state::RESET, ibv_qp_state::INIT) => true,
        (ibv_qp_state::INIT, ibv_qp_state::RTR) => {
            // The peer is addressed by GID: is_global and a destination QP are required.
            if mask & qp_attr_mask::AV == 0
                || mask & qp_attr_mask::DEST_QPN == 0
                || a.ah_attr.is_global != 1
            {
                false
            } else {
                st.dest = Some((a.ah_attr.grh.dgid.raw, a.dest_qp_num));
                true
            }
        }
        (ibv_qp_state::RTR, ibv_qp_state::RTS) => true,
        _ => false,
    };
    if !ok {
        return libc::EINVAL;
    }
    if next == ibv_qp_state::RESET {
        st.recvs.clear();
        st.recv_frames = 0;
        st.dest = None;
    }
    st.state = next;
    soft.qp.state = next;
    0
}

/// Delivers a message `from` a queue pair `to` a local one, as the wire would: silently
/// nothing when the queue pair is gone, not connected back to the sender, or its next receive
/// spans another number of frames. Runs on the fabric's reader threads.
fn deliver(from: QpKey, to: QpKey, payload: &[u8]) {
    let peer = registry()
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .get(&to)
        .and_then(Weak::upgrade);
    let Some(peer) = peer else { return };
    // The lock is held through the copy and the completion, so `destroy_qp` (which takes it)
    // cannot return while the receive buffer or the completion queue is in use.
    let mut st = peer.st.lock().unwrap_or_else(|e| e.into_inner());
    if st.destroyed
        || !matches!(st.state, ibv_qp_state::RTR | ibv_qp_state::RTS)
        || st.dest != Some(from)
    {
        return;
    }
    let Some(front) = st.recvs.front() else {
        return;
    };
    if frames(front.len) != frames(payload.len()) {
        return;
    }
    let recv = st.recvs.pop_front().expect("front checked");
    st.recv_frames -= frames(recv.len);
    let (status, byte_len) = if payload.len() > recv.len {
        (ibv_wc_status::LOC_LEN_ERR, 0)
    } else {
        // SAFETY: the range was checked against a registered region when posted, and the verbs
        // contract keeps it registered and alive until its completion is polled or the queue
        // pair is destroyed (excluded by the lock held).
        unsafe {
            std::ptr::copy_nonoverlapping(payload.as_ptr(), recv.addr as *mut u8, payload.len())
        };
        (ibv_wc_status::SUCCESS, payload.len() as u32)
    };
    let wc = ibv_wc {
        wr_id: recv.wr_id,
        status,
        opcode: ibv_wc_opcode::RECV,
        byte_len,
        qp_num: peer.key.1,
        ..Default::default()
    };
    // SAFETY: the receive CQ outlives the queue pair (verbs contract), alive under the lock.
    unsafe { &*peer.recv_cq }.push(Completion {
        wc,
        qp: Arc::downgrade(&peer),
        frames: 0,
    });
}

/// The one SGE of a work request as (address, length, lkey); an empty request is (0, 0, 0).
///
/// # Safety
/// `sg_list` must hold `num_sge` entries, and `num_sge` must be 0 or 1.
unsafe fn single_sge(num_sge: c_int, sg_list: *const ibv_sge) -> (u64, usize, u32) {
    if num_sge == 1 {
        // SAFETY: one entry at `sg_list`, per the contract.
        let sge = unsafe { *sg_list };
        (sge.addr, sge.length as usize, sge.lkey)
    } else {
        (0, 0, 0)
    }
}

unsafe extern "C" fn post_send(
    qp: *mut ibv_qp,
    wr: *mut ibv_send_wr,
    bad_wr: *mut *mut ibv_send_wr,
) -> c_int {
    // SAFETY: `qp` came from `create_qp`.
    let shared = unsafe { &(*qp.cast::<SoftQp>()).shared };
    let mut w = wr;
    while !w.is_null() {
        // SAFETY: the caller passes a valid list.
        let r = unsafe { *w };
        let refuse = |e: c_int| {
            if !bad_wr.is_null() {
                // SAFETY: valid out-pointer from the caller.
                unsafe { *bad_wr = w };
            }
            e
        };
        if r.opcode != ibv_wr_opcode::SEND || !(0..=1).contains(&r.num_sge) {
            return refuse(libc::EINVAL);
        }
        // SAFETY: `sg_list` holds `num_sge` (0 or 1, checked above) entries.
        let (addr, len, lkey) = unsafe { single_sge(r.num_sge, r.sg_list) };
        if len > MAX_MESSAGE {
            return refuse(libc::EINVAL);
        }
        let dest = {
            let st = shared.st.lock().unwrap_or_else(|e| e.into_inner());
            if st.state != ibv_qp_state::RTS {
                return refuse(libc::EINVAL);
            }
            st.dest
        };
        let f = frames(len);
        let taken =
            shared
                .sends_outstanding
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |out| {
                    (out + f <= shared.max_send).then_some(out + f)
                });
        if taken.is_err() {
            return refuse(libc::ENOMEM);
        }
        // SAFETY: the context outlives its queue pairs.
        let protected = len == 0 || unsafe { &*shared.ctx }.covers(lkey, addr, len);
        let status = if protected {
            if let Some(dest) = dest {
                let payload = if len == 0 {
                    &[][..]
                } else {
                    // SAFETY: `[addr, addr + len)` lies in a registered region (checked above),
                    // which the caller keeps alive until the send completes.
                    unsafe { std::slice::from_raw_parts(addr as *const u8, len) }
                };
                shared
                    .wire
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .transmit(shared.key, dest, payload);
            }
            ibv_wc_status::SUCCESS
        } else {
            ibv_wc_status::LOC_PROT_ERR
        };
        let signaled = shared.sig_all || r.send_flags & send_flags::SIGNALED != 0 || !protected;
        if signaled {
            let wc = ibv_wc {
                wr_id: r.wr_id,
                status,
                opcode: ibv_wc_opcode::SEND,
                qp_num: shared.key.1,
                ..Default::default()
            };
            // SAFETY: the send CQ outlives the queue pair.
            unsafe { &*shared.send_cq }.push(Completion {
                wc,
                qp: Arc::downgrade(shared),
                frames: f,
            });
        } else {
            shared.sends_outstanding.fetch_sub(f, Ordering::AcqRel);
        }
        w = r.next;
    }
    0
}

unsafe extern "C" fn post_recv(
    qp: *mut ibv_qp,
    wr: *mut ibv_recv_wr,
    bad_wr: *mut *mut ibv_recv_wr,
) -> c_int {
    // SAFETY: `qp` came from `create_qp`.
    let shared = unsafe { &(*qp.cast::<SoftQp>()).shared };
    let mut w = wr;
    while !w.is_null() {
        // SAFETY: the caller passes a valid list.
        let r = unsafe { *w };
        let refuse = |e: c_int| {
            if !bad_wr.is_null() {
                // SAFETY: valid out-pointer from the caller.
                unsafe { *bad_wr = w };
            }
            e
        };
        if !(0..=1).contains(&r.num_sge) {
            return refuse(libc::EINVAL);
        }
        // SAFETY: `sg_list` holds `num_sge` (0 or 1, checked above) entries.
        let (addr, len, lkey) = unsafe { single_sge(r.num_sge, r.sg_list) };
        // SAFETY: the context outlives its queue pairs.
        if len > 0 && !unsafe { &*shared.ctx }.covers(lkey, addr, len) {
            return refuse(libc::EINVAL);
        }
        let mut st = shared.st.lock().unwrap_or_else(|e| e.into_inner());
        if st.state == ibv_qp_state::RESET || st.state == ibv_qp_state::ERR {
            return refuse(libc::EINVAL);
        }
        if st.recv_frames + frames(len) > st.max_recv {
            return refuse(libc::ENOMEM);
        }
        st.recv_frames += frames(len);
        st.recvs.push_back(Recv {
            wr_id: r.wr_id,
            addr,
            len,
        });
        w = r.next;
    }
    0
}

unsafe extern "C" fn poll_cq(cq: *mut ibv_cq, num_entries: c_int, wc: *mut ibv_wc) -> c_int {
    if cq.is_null() || (wc.is_null() && num_entries > 0) {
        return -libc::EINVAL;
    }
    // SAFETY: `cq` came from `create_cq`.
    let soft = unsafe { &*cq.cast::<SoftCq>() };
    let mut entries = soft.entries.lock().unwrap_or_else(|e| e.into_inner());
    let mut n = 0;
    while n < num_entries.max(0) as usize {
        let Some(c) = entries.pop_front() else { break };
        if c.frames > 0
            && let Some(qp) = c.qp.upgrade()
        {
            qp.sends_outstanding.fetch_sub(c.frames, Ordering::AcqRel);
        }
        // SAFETY: the caller's array has room for `num_entries` completions.
        unsafe { *wc.add(n) = c.wc };
        n += 1;
    }
    n as c_int
}

unsafe extern "C" fn req_notify_cq(_cq: *mut ibv_cq, _solicited_only: c_int) -> c_int {
    0
}

impl Verbs {
    /// The software device's function table, used in place of a loaded library.
    pub fn software() -> Verbs {
        let table = VerbsTable {
            get_device_list,
            free_device_list,
            get_device_name,
            open_device,
            close_device,
            query_device,
            query_port,
            query_gid,
            alloc_pd,
            dealloc_pd,
            reg_mr,
            dereg_mr,
            create_cq,
            destroy_cq,
            create_qp,
            destroy_qp,
            modify_qp,
        };
        Verbs::from_table(table, "software verbs device")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops;
    use std::time::{Duration, Instant};

    const PATIENCE: Duration = Duration::from_secs(5);
    /// How long a test waits to be sure that nothing arrives.
    const QUIET: Duration = Duration::from_millis(200);

    /// One node: a context, protection domain, completion queue, queue pair and a registered
    /// buffer.
    struct Node {
        v: Verbs,
        ctx: *mut ibv_context,
        pd: *mut ibv_pd,
        cq: *mut ibv_cq,
        qp: *mut ibv_qp,
        mr: *mut ibv_mr,
        buf: Vec<u8>,
    }

    impl Node {
        fn new(send_wr: u32) -> Node {
            let v = Verbs::software();
            let mut n = 0;
            // SAFETY: test calls of the software device's verbs with valid arguments.
            unsafe {
                let list = (v.get_device_list)(&mut n);
                let ctx = (v.open_device)(*list);
                (v.free_device_list)(list);
                let pd = (v.alloc_pd)(ctx);
                let cq = (v.create_cq)(ctx, 8192, std::ptr::null_mut(), std::ptr::null_mut(), 0);
                let mut init = ibv_qp_init_attr {
                    qp_context: std::ptr::null_mut(),
                    send_cq: cq,
                    recv_cq: cq,
                    srq: std::ptr::null_mut(),
                    cap: ibv_qp_cap {
                        max_send_wr: send_wr,
                        max_recv_wr: 64,
                        max_send_sge: 1,
                        max_recv_sge: 1,
                        max_inline_data: 0,
                    },
                    qp_type: ibv_qp_type::UC,
                    sq_sig_all: 0,
                };
                let qp = (v.create_qp)(pd, &mut init);
                assert!(!qp.is_null());
                let mut buf = vec![0u8; 3 * FRAME];
                let mr = (v.reg_mr)(
                    pd,
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    access::LOCAL_WRITE as c_int,
                );
                assert!(!mr.is_null());
                Node {
                    v,
                    ctx,
                    pd,
                    cq,
                    qp,
                    mr,
                    buf,
                }
            }
        }

        fn gid(&self) -> ibv_gid {
            let mut g = ibv_gid::default();
            // SAFETY: valid context and out-pointer.
            assert_eq!(unsafe { (self.v.query_gid)(self.ctx, 1, 1, &mut g) }, 0);
            g
        }

        fn qpn(&self) -> u32 {
            // SAFETY: the queue pair is live.
            unsafe { (*self.qp).qp_num }
        }

        fn connect(&self, peer: &Node) {
            let mut a = ibv_qp_attr {
                qp_state: ibv_qp_state::INIT,
                ..Default::default()
            };
            // SAFETY: valid queue pair and attributes.
            unsafe {
                assert_eq!((self.v.modify_qp)(self.qp, &mut a, qp_attr_mask::STATE), 0);
                a.qp_state = ibv_qp_state::RTR;
                a.dest_qp_num = peer.qpn();
                a.ah_attr.is_global = 1;
                a.ah_attr.grh.dgid = peer.gid();
                let mask = qp_attr_mask::STATE | qp_attr_mask::AV | qp_attr_mask::DEST_QPN;
                assert_eq!((self.v.modify_qp)(self.qp, &mut a, mask), 0);
                a.qp_state = ibv_qp_state::RTS;
                assert_eq!((self.v.modify_qp)(self.qp, &mut a, qp_attr_mask::STATE), 0);
            }
        }

        fn post_recv(&mut self, len: usize, id: u64) -> c_int {
            // SAFETY: the SGE is inside the registered buffer.
            unsafe {
                let mut sge = ibv_sge {
                    addr: self.buf.as_ptr() as u64,
                    length: len as u32,
                    lkey: (*self.mr).lkey,
                };
                let mut wr = ibv_recv_wr {
                    wr_id: id,
                    next: std::ptr::null_mut(),
                    sg_list: &mut sge,
                    num_sge: 1,
                };
                let mut bad = std::ptr::null_mut();
                ops::post_recv(self.qp, &mut wr, &mut bad)
            }
        }

        fn post_send(&mut self, data: &[u8], id: u64) -> c_int {
            self.buf[..data.len()].copy_from_slice(data);
            // SAFETY: the SGE is inside the registered buffer.
            unsafe {
                let mut sge = ibv_sge {
                    addr: self.buf.as_ptr() as u64,
                    length: data.len() as u32,
                    lkey: (*self.mr).lkey,
                };
                let mut wr = ibv_send_wr::send(id, &mut sge);
                let mut bad = std::ptr::null_mut();
                ops::post_send(self.qp, &mut wr, &mut bad)
            }
        }

        fn poll(&self) -> Vec<ibv_wc> {
            let mut wc = [ibv_wc::default(); 16];
            // SAFETY: valid CQ and room for 16 completions.
            let n = unsafe { ops::poll_cq(self.cq, 16, wc.as_mut_ptr()) };
            assert!(n >= 0);
            wc[..n as usize].to_vec()
        }

        /// Polls until `n` completions have come or `patience` has passed (the fabric delivers
        /// on its own threads).
        fn poll_for(&self, n: usize, patience: Duration) -> Vec<ibv_wc> {
            let end = Instant::now() + patience;
            let mut got = Vec::new();
            while got.len() < n && Instant::now() < end {
                got.extend(self.poll());
                std::thread::sleep(Duration::from_micros(200));
            }
            got
        }
    }

    impl Drop for Node {
        fn drop(&mut self) {
            // SAFETY: children first, each destroyed once.
            unsafe {
                (self.v.destroy_qp)(self.qp);
                (self.v.dereg_mr)(self.mr);
                (self.v.destroy_cq)(self.cq);
                (self.v.dealloc_pd)(self.pd);
                (self.v.close_device)(self.ctx);
            }
        }
    }

    fn pair() -> (Node, Node) {
        let (a, b) = (Node::new(64), Node::new(64));
        a.connect(&b);
        b.connect(&a);
        (a, b)
    }

    #[test]
    fn a_send_lands_in_a_receive_of_the_same_frame_count() {
        let (mut a, mut b) = pair();
        assert_eq!(b.post_recv(2 * FRAME, 7), 0);
        let data: Vec<u8> = (0..5000u32).map(|i| i as u8).collect();
        assert_eq!(a.post_send(&data, 9), 0);
        let sent = a.poll();
        assert_eq!(
            (sent.len(), sent[0].wr_id, sent[0].status),
            (1, 9, ibv_wc_status::SUCCESS)
        );
        let got = b.poll_for(1, PATIENCE);
        assert_eq!((got.len(), got[0].wr_id, got[0].byte_len), (1, 7, 5000));
        assert_eq!(got[0].opcode, ibv_wc_opcode::RECV);
        assert_eq!(&b.buf[..5000], &data[..]);
    }

    #[test]
    fn a_send_into_a_receive_of_another_frame_count_is_dropped_silently() {
        let (mut a, mut b) = pair();
        assert_eq!(b.post_recv(FRAME, 1), 0);
        // Two frames into a one-frame receive: the send "succeeds", nothing arrives.
        assert_eq!(a.post_send(&[5u8; 5000], 2), 0);
        assert_eq!(a.poll()[0].status, ibv_wc_status::SUCCESS);
        assert!(b.poll_for(1, QUIET).is_empty());
        // The receive is still posted and takes a matching send.
        assert_eq!(a.post_send(&[6u8; 100], 3), 0);
        let got = b.poll_for(1, PATIENCE);
        assert_eq!((got.len(), got[0].byte_len), (1, 100));
    }

    #[test]
    fn the_work_request_budget_is_enforced() {
        let (mut a, b) = (Node::new(MAX_WR as u32), Node::new(64));
        a.connect(&b);
        b.connect(&a);
        for i in 0..MAX_WR {
            assert_eq!(a.post_send(b"x", i as u64), 0, "send {i}");
        }
        assert_eq!(
            a.post_send(b"x", 9999),
            libc::ENOMEM,
            "the 4096th outstanding request"
        );
        // Polling completions releases the budget.
        let mut polled = 0;
        while polled < 100 {
            polled += a.poll().len();
        }
        assert_eq!(a.post_send(b"x", 10000), 0);
    }

    #[test]
    fn queue_depth_counts_frames() {
        let (mut a, mut b) = (Node::new(8), Node::new(8));
        a.connect(&b);
        b.connect(&a);
        // max_recv_wr is 64 frames: 32 two-frame receives fill it.
        for i in 0..32 {
            assert_eq!(b.post_recv(2 * FRAME, i), 0, "receive {i}");
        }
        assert_eq!(b.post_recv(1, 99), libc::ENOMEM, "the 65th frame");
        // max_send_wr is 8 frames: four two-frame sends fill it, the fifth is refused.
        let two = vec![1u8; FRAME + 1];
        for i in 0..4 {
            assert_eq!(a.post_send(&two, i), 0, "send {i}");
        }
        assert_eq!(a.post_send(&two, 4), libc::ENOMEM);
        assert_eq!(a.poll_for(4, PATIENCE).len(), 4);
        assert_eq!(a.post_send(&two, 5), 0, "polling released the frames");
        // Deliveries free receive frames: five sends took five receives.
        assert_eq!(b.poll_for(5, PATIENCE).len(), 5);
        assert_eq!(b.post_recv(2 * FRAME, 100), 0);
    }

    #[test]
    fn messages_arrive_in_order() {
        let (mut a, mut b) = pair();
        for i in 0..40u64 {
            assert_eq!(b.post_recv(8, i), 0);
        }
        for i in 0..40u64 {
            assert_eq!(a.post_send(&i.to_le_bytes(), i), 0);
            a.poll();
        }
        let got = b.poll_for(40, PATIENCE);
        let ids: Vec<u64> = got.iter().map(|w| w.wr_id).collect();
        assert_eq!(ids, (0..40).collect::<Vec<_>>());
    }

    #[test]
    fn a_dead_peer_produces_no_error() {
        let (mut a, b) = pair();
        drop(b);
        assert_eq!(a.post_send(b"into the void", 1), 0);
        assert_eq!(a.poll()[0].status, ibv_wc_status::SUCCESS);
    }

    #[test]
    fn apples_limits_are_enforced() {
        let v = Verbs::software();
        let mut n = 0;
        // SAFETY: test calls with valid arguments; everything created is destroyed.
        unsafe {
            let list = (v.get_device_list)(&mut n);
            assert_eq!(n, 1);
            let name = CStr::from_ptr((v.get_device_name)(*list));
            assert_eq!(name.to_str().unwrap(), "softrdma0");
            let ctx = (v.open_device)(*list);
            (v.free_device_list)(list);
            let mut port = ibv_port_attr::default();
            assert_eq!((v.query_port)(ctx, 1, &mut port), 0);
            assert_eq!(port.link_layer, ibv_link_layer::THUNDERBOLT);
            assert_eq!(port.max_msg_sz as usize, MAX_MESSAGE);
            let mut gid = ibv_gid::default();
            assert_eq!((v.query_gid)(ctx, 1, 1, &mut gid), 0);
            assert_eq!(
                &gid.raw[..12],
                &[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff],
                "IPv4-mapped"
            );
            let pd = (v.alloc_pd)(ctx);
            let cq = (v.create_cq)(ctx, 16, std::ptr::null_mut(), std::ptr::null_mut(), 0);
            let mut init = ibv_qp_init_attr {
                qp_context: std::ptr::null_mut(),
                send_cq: cq,
                recv_cq: cq,
                srq: std::ptr::null_mut(),
                cap: ibv_qp_cap {
                    max_send_wr: 16,
                    max_recv_wr: 16,
                    max_send_sge: 1,
                    max_recv_sge: 1,
                    max_inline_data: 0,
                },
                qp_type: ibv_qp_type::RC,
                sq_sig_all: 0,
            };
            assert!((v.create_qp)(pd, &mut init).is_null(), "RC is refused");
            init.qp_type = ibv_qp_type::UC;
            init.cap.max_send_sge = 2;
            assert!((v.create_qp)(pd, &mut init).is_null(), "one SGE only");
            init.cap.max_send_sge = 1;
            let qps: Vec<_> = (0..MAX_QP).map(|_| (v.create_qp)(pd, &mut init)).collect();
            assert!(qps.iter().all(|q| !q.is_null()));
            assert!(
                (v.create_qp)(pd, &mut init).is_null(),
                "at most {MAX_QP} queue pairs"
            );
            let mut page = vec![0u8; 64];
            let mrs: Vec<_> = (0..MAX_MR)
                .map(|_| (v.reg_mr)(pd, page.as_mut_ptr().cast(), 64, 1))
                .collect();
            assert!(mrs.iter().all(|m| !m.is_null()));
            assert!(
                (v.reg_mr)(pd, page.as_mut_ptr().cast(), 64, 1).is_null(),
                "at most {MAX_MR} regions"
            );
            for q in qps {
                (v.destroy_qp)(q);
            }
            for m in mrs {
                (v.dereg_mr)(m);
            }
            (v.destroy_cq)(cq);
            (v.dealloc_pd)(pd);
            (v.close_device)(ctx);
        }
    }

    #[test]
    fn the_device_list_api_sees_the_software_device() {
        let v = Verbs::software();
        assert_eq!(
            v.device_names().unwrap(),
            vec![crate::DeviceName("softrdma0".into())]
        );
        assert!(matches!(
            v.require_device(Some("rdma_en9")),
            Err(crate::Error::NoDevice { .. })
        ));
    }
}
