//! A safe layer over the verbs: every handle is owned by a value that releases it on drop, and
//! children keep their parents alive (a protection domain cannot be freed before its memory
//! regions, nor a context before anything of it). Budgets Apple's provider imposes are checked
//! before the verb is called, and every completion's status is checked.

use std::ffi::c_int;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use crate::Verbs;
use crate::error::{Error, Result};
use crate::ops;
use crate::types::*;

/// Memory regions a context may hold at once (Apple allows about 100).
pub const MR_BUDGET: usize = 100;
/// Outstanding work requests per queue (Apple: 4095).
pub const WR_BUDGET: usize = 4095;

fn verb_error(verb: &'static str, rc: c_int) -> Error {
    let source = if rc > 0 {
        std::io::Error::from_raw_os_error(rc)
    } else {
        std::io::Error::last_os_error()
    };
    Error::Verb { verb, source }
}

struct ContextInner {
    verbs: Arc<Verbs>,
    raw: *mut ibv_context,
    mrs: AtomicUsize,
}

// SAFETY: a verbs context may be used from any thread; the pointer is only freed in Drop.
unsafe impl Send for ContextInner {}
// SAFETY: as above.
unsafe impl Sync for ContextInner {}

impl Drop for ContextInner {
    fn drop(&mut self) {
        // SAFETY: `raw` came from `open_device`; every child holds an Arc to this, so it is last.
        unsafe { (self.verbs.close_device)(self.raw) };
    }
}

/// An open device.
#[derive(Clone)]
pub struct Context {
    inner: Arc<ContextInner>,
}

/// A GID and its index in the port's table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Gid {
    /// Table index.
    pub index: u8,
    /// The GID (network order).
    pub gid: ibv_gid,
}

impl Gid {
    /// Whether this is an IPv4-mapped GID (`::ffff:a.b.c.d`), as a Thunderbolt or RoCEv2 port
    /// derives from an IPv4 address.
    pub fn is_ipv4_mapped(&self) -> bool {
        self.gid.raw[..10].iter().all(|&b| b == 0)
            && self.gid.raw[10] == 0xff
            && self.gid.raw[11] == 0xff
    }
}

impl Context {
    /// Opens the named device (or the first) of `verbs`.
    ///
    /// # Errors
    /// As [`Verbs::require_device`]; [`Error::Verb`] when `ibv_open_device` fails.
    pub fn open(verbs: Arc<Verbs>, name: Option<&str>) -> Result<Context> {
        let wanted = verbs.require_device(name)?;
        let mut n = 0;
        // SAFETY: valid out-pointer; the list is freed below, after use.
        let list = unsafe { (verbs.get_device_list)(&mut n) };
        if list.is_null() {
            return Err(verb_error("ibv_get_device_list", 0));
        }
        let mut raw = std::ptr::null_mut();
        for i in 0..usize::try_from(n).unwrap_or(0) {
            // SAFETY: the list holds `n` device pointers.
            let dev = unsafe { *list.add(i) };
            // SAFETY: `dev` is a listed device; its name is NUL-terminated.
            let name = unsafe { std::ffi::CStr::from_ptr((verbs.get_device_name)(dev)) };
            if name.to_string_lossy() == wanted.0 {
                // SAFETY: `dev` is a listed device, opened before the list is freed.
                raw = unsafe { (verbs.open_device)(dev) };
                break;
            }
        }
        // SAFETY: `list` is non-NULL and freed once.
        unsafe { (verbs.free_device_list)(list) };
        if raw.is_null() {
            return Err(verb_error("ibv_open_device", 0));
        }
        Ok(Context {
            inner: Arc::new(ContextInner {
                verbs,
                raw,
                mrs: AtomicUsize::new(0),
            }),
        })
    }

    /// `ibv_query_device`.
    ///
    /// # Errors
    /// [`Error::Verb`] with the errno.
    pub fn query_device(&self) -> Result<ibv_device_attr> {
        // SAFETY: all-zero is a valid `ibv_device_attr`.
        let mut attr: ibv_device_attr = unsafe { std::mem::zeroed() };
        // SAFETY: live context, valid out-pointer.
        match unsafe { (self.inner.verbs.query_device)(self.inner.raw, &mut attr) } {
            0 => Ok(attr),
            rc => Err(verb_error("ibv_query_device", rc)),
        }
    }

    /// `ibv_query_port`.
    ///
    /// # Errors
    /// [`Error::Verb`] with the errno.
    pub fn query_port(&self, port: u8) -> Result<ibv_port_attr> {
        let mut attr = ibv_port_attr::default();
        // SAFETY: live context, valid out-pointer.
        match unsafe { (self.inner.verbs.query_port)(self.inner.raw, port, &mut attr) } {
            0 => Ok(attr),
            rc => Err(verb_error("ibv_query_port", rc)),
        }
    }

    /// Every GID of `port`'s table.
    ///
    /// # Errors
    /// [`Error::Verb`] when the port or a GID cannot be queried.
    pub fn gids(&self, port: u8) -> Result<Vec<Gid>> {
        let len = self.query_port(port)?.gid_tbl_len.clamp(0, 256);
        let mut out = Vec::new();
        for index in 0..len {
            let mut gid = ibv_gid::default();
            // SAFETY: live context, valid out-pointer.
            match unsafe { (self.inner.verbs.query_gid)(self.inner.raw, port, index, &mut gid) } {
                0 => out.push(Gid {
                    index: index as u8,
                    gid,
                }),
                rc => return Err(verb_error("ibv_query_gid", rc)),
            }
        }
        Ok(out)
    }

    /// The IPv4-mapped GID to address this port by, found by scanning the table (its index
    /// differs between devices and configurations, so it is never assumed).
    ///
    /// # Errors
    /// [`Error::NoDevice`]-like configuration error as [`Error::Verb`] (ENOENT) when the port has
    /// no IPv4 address (Thunderbolt needs one, link-local is fine).
    pub fn ipv4_gid(&self, port: u8) -> Result<Gid> {
        self.gids(port)?
            .into_iter()
            .find(Gid::is_ipv4_mapped)
            .ok_or_else(|| Error::Verb {
                verb: "ibv_query_gid (no IPv4-mapped GID: give the interface an IPv4 address)",
                source: std::io::Error::from_raw_os_error(libc::ENOENT),
            })
    }

    /// Allocates a protection domain.
    ///
    /// # Errors
    /// [`Error::Verb`] with the errno.
    pub fn alloc_pd(&self) -> Result<ProtectionDomain> {
        // SAFETY: live context.
        let raw = unsafe { (self.inner.verbs.alloc_pd)(self.inner.raw) };
        if raw.is_null() {
            return Err(verb_error("ibv_alloc_pd", 0));
        }
        Ok(ProtectionDomain {
            inner: Arc::new(PdInner {
                ctx: self.inner.clone(),
                raw,
            }),
        })
    }

    /// Creates a completion queue of `entries`.
    ///
    /// # Errors
    /// [`Error::Verb`] with the errno.
    pub fn create_cq(&self, entries: usize) -> Result<CompletionQueue> {
        let cqe = c_int::try_from(entries).unwrap_or(c_int::MAX);
        // SAFETY: live context; no channel.
        let raw = unsafe {
            (self.inner.verbs.create_cq)(
                self.inner.raw,
                cqe,
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                0,
            )
        };
        if raw.is_null() {
            return Err(verb_error("ibv_create_cq", 0));
        }
        Ok(CompletionQueue {
            inner: Arc::new(CqInner {
                ctx: self.inner.clone(),
                raw,
            }),
        })
    }
}

struct PdInner {
    ctx: Arc<ContextInner>,
    raw: *mut ibv_pd,
}

// SAFETY: verbs objects may be used from any thread; freed only in Drop.
unsafe impl Send for PdInner {}
// SAFETY: as above.
unsafe impl Sync for PdInner {}

impl Drop for PdInner {
    fn drop(&mut self) {
        // SAFETY: `raw` came from `alloc_pd`; its children hold Arcs to this, so they are gone.
        unsafe { (self.ctx.verbs.dealloc_pd)(self.raw) };
    }
}

/// A protection domain.
#[derive(Clone)]
pub struct ProtectionDomain {
    inner: Arc<PdInner>,
}

/// A registered buffer, owned: the memory stays registered and alive as long as this value.
pub struct MemoryRegion {
    pd: Arc<PdInner>,
    raw: *mut ibv_mr,
    buf: Box<[u8]>,
}

// SAFETY: the region and its buffer are owned by this value; freed only in Drop.
unsafe impl Send for MemoryRegion {}

impl MemoryRegion {
    /// The local key, for SGEs.
    pub fn lkey(&self) -> u32 {
        // SAFETY: `raw` is live while `self` is.
        unsafe { (*self.raw).lkey }
    }

    /// The buffer.
    pub fn bytes(&self) -> &[u8] {
        &self.buf
    }

    /// The buffer, mutable (not while a work request uses it).
    pub fn bytes_mut(&mut self) -> &mut [u8] {
        &mut self.buf
    }

    /// The SGE covering `range` of the buffer.
    ///
    /// # Panics
    /// When `range` is outside the buffer (a caller bug).
    pub fn sge(&self, range: std::ops::Range<usize>) -> ibv_sge {
        assert!(
            range.end <= self.buf.len(),
            "SGE outside the registered buffer"
        );
        ibv_sge {
            addr: self.buf.as_ptr() as u64 + range.start as u64,
            length: range.len() as u32,
            lkey: self.lkey(),
        }
    }
}

impl Drop for MemoryRegion {
    fn drop(&mut self) {
        // SAFETY: `raw` came from `reg_mr`; deregistered before the buffer is freed.
        unsafe { (self.pd.ctx.verbs.dereg_mr)(self.raw) };
        self.pd.ctx.mrs.fetch_sub(1, Ordering::Relaxed);
    }
}

impl ProtectionDomain {
    /// Registers a new zeroed buffer of `len` bytes, within the context's [`MR_BUDGET`].
    ///
    /// # Errors
    /// [`Error::Verb`] (ENOMEM) when the budget is spent, or when `ibv_reg_mr` fails.
    pub fn register(&self, len: usize) -> Result<MemoryRegion> {
        let ctx = &self.inner.ctx;
        if ctx.mrs.fetch_add(1, Ordering::Relaxed) >= MR_BUDGET {
            ctx.mrs.fetch_sub(1, Ordering::Relaxed);
            return Err(Error::Verb {
                verb: "ibv_reg_mr (the memory-region budget is spent)",
                source: std::io::Error::from_raw_os_error(libc::ENOMEM),
            });
        }
        let mut buf = vec![0u8; len.max(1)].into_boxed_slice();
        let access = (access::LOCAL_WRITE | access::REMOTE_WRITE | access::REMOTE_READ) as c_int;
        // SAFETY: live PD; the buffer outlives the registration (deregistered in Drop first).
        let raw = unsafe {
            (ctx.verbs.reg_mr)(self.inner.raw, buf.as_mut_ptr().cast(), buf.len(), access)
        };
        if raw.is_null() {
            ctx.mrs.fetch_sub(1, Ordering::Relaxed);
            return Err(verb_error("ibv_reg_mr", 0));
        }
        Ok(MemoryRegion {
            pd: self.inner.clone(),
            raw,
            buf,
        })
    }

    /// Creates a queue pair: UC on a Thunderbolt port (Apple refuses RC), RC elsewhere.
    ///
    /// # Errors
    /// [`Error::Verb`] when `ibv_create_qp` refuses.
    pub fn create_qp(
        &self,
        cq: &CompletionQueue,
        send_wr: usize,
        recv_wr: usize,
        link: ibv_link_layer,
    ) -> Result<QueuePair> {
        let qp_type = if link == ibv_link_layer::THUNDERBOLT {
            ibv_qp_type::UC
        } else {
            ibv_qp_type::RC
        };
        let mut init = ibv_qp_init_attr {
            qp_context: std::ptr::null_mut(),
            send_cq: cq.inner.raw,
            recv_cq: cq.inner.raw,
            srq: std::ptr::null_mut(),
            cap: ibv_qp_cap {
                max_send_wr: send_wr.min(WR_BUDGET) as u32,
                max_recv_wr: recv_wr.min(WR_BUDGET) as u32,
                max_send_sge: 1,
                max_recv_sge: 1,
                max_inline_data: 0,
            },
            qp_type,
            sq_sig_all: 0,
        };
        // SAFETY: live PD and CQ; `init` is valid for the call.
        let raw = unsafe { (self.inner.ctx.verbs.create_qp)(self.inner.raw, &mut init) };
        if raw.is_null() {
            return Err(verb_error("ibv_create_qp", 0));
        }
        Ok(QueuePair {
            pd: self.inner.clone(),
            _cq: cq.inner.clone(),
            raw,
            outstanding: Mutex::new((0, 0)),
            max: (send_wr.min(WR_BUDGET), recv_wr.min(WR_BUDGET)),
        })
    }
}

struct CqInner {
    ctx: Arc<ContextInner>,
    raw: *mut ibv_cq,
}

// SAFETY: verbs objects may be used from any thread; freed only in Drop.
unsafe impl Send for CqInner {}
// SAFETY: as above.
unsafe impl Sync for CqInner {}

impl Drop for CqInner {
    fn drop(&mut self) {
        // SAFETY: `raw` came from `create_cq`; queue pairs using it hold Arcs, so they are gone.
        unsafe { (self.ctx.verbs.destroy_cq)(self.raw) };
    }
}

/// A completion queue.
#[derive(Clone)]
pub struct CompletionQueue {
    inner: Arc<CqInner>,
}

impl CompletionQueue {
    /// Polls up to `wc.len()` completions; a completion with a failed status is an error (the
    /// MLX backend EXO uses does not check it).
    ///
    /// # Errors
    /// [`Error::Verb`] when polling fails or a completion failed (the status in the message).
    pub fn poll(&self, wc: &mut [ibv_wc]) -> Result<usize> {
        let n = c_int::try_from(wc.len()).unwrap_or(c_int::MAX);
        // SAFETY: live CQ; `wc` has room for `n` completions.
        let got = unsafe { ops::poll_cq(self.inner.raw, n, wc.as_mut_ptr()) };
        if got < 0 {
            return Err(verb_error("ibv_poll_cq", -got));
        }
        let got = got as usize;
        if let Some(bad) = wc[..got]
            .iter()
            .find(|w| w.status != ibv_wc_status::SUCCESS)
        {
            return Err(Error::Verb {
                verb: "work completion",
                source: std::io::Error::other(format!(
                    "work request {} completed with status {} (vendor error {})",
                    bad.wr_id, bad.status.0, bad.vendor_err
                )),
            });
        }
        Ok(got)
    }
}

/// A queue pair's address, exchanged with the peer (inside sinew's authenticated handshake).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Endpoint {
    /// The GID the peer addresses this port by.
    pub gid: ibv_gid,
    /// The queue pair number.
    pub qpn: u32,
    /// The first packet sequence number.
    pub psn: u32,
}

/// A queue pair.
pub struct QueuePair {
    pd: Arc<PdInner>,
    _cq: Arc<CqInner>,
    raw: *mut ibv_qp,
    /// Outstanding (sends, receives), against `max`.
    outstanding: Mutex<(usize, usize)>,
    max: (usize, usize),
}

// SAFETY: the queue pair is owned by this value; the verbs allow posting from any thread.
unsafe impl Send for QueuePair {}

impl Drop for QueuePair {
    fn drop(&mut self) {
        // SAFETY: `raw` came from `create_qp`, destroyed once, before its PD and CQ (Arcs).
        unsafe { (self.pd.ctx.verbs.destroy_qp)(self.raw) };
    }
}

impl QueuePair {
    /// The queue pair number.
    pub fn qpn(&self) -> u32 {
        // SAFETY: live queue pair.
        unsafe { (*self.raw).qp_num }
    }

    fn modify(&self, attr: &mut ibv_qp_attr, mask: i32, what: &'static str) -> Result<()> {
        // SAFETY: live queue pair; `attr` valid for the call.
        match unsafe { (self.pd.ctx.verbs.modify_qp)(self.raw, attr, mask) } {
            0 => Ok(()),
            rc => Err(verb_error(what, rc)),
        }
    }

    /// Moves the queue pair through INIT, RTR and RTS towards `peer`, addressed by GID from
    /// local GID index `sgid_index` on `port`.
    ///
    /// # Errors
    /// [`Error::Verb`] naming the transition that failed.
    pub fn connect(&self, port: u8, sgid_index: u8, local_psn: u32, peer: Endpoint) -> Result<()> {
        let mut a = ibv_qp_attr {
            qp_state: ibv_qp_state::INIT,
            port_num: port,
            qp_access_flags: access::LOCAL_WRITE | access::REMOTE_WRITE,
            ..Default::default()
        };
        self.modify(
            &mut a,
            qp_attr_mask::STATE
                | qp_attr_mask::PKEY_INDEX
                | qp_attr_mask::PORT
                | qp_attr_mask::ACCESS_FLAGS,
            "ibv_modify_qp(INIT)",
        )?;
        a.qp_state = ibv_qp_state::RTR;
        // The path MTU the port runs at (RoCE over a 1500-byte Ethernet: 1024), not a guess.
        let port_attr = Context {
            inner: self.pd.ctx.clone(),
        }
        .query_port(port)?;
        a.path_mtu = port_attr.active_mtu;
        a.dest_qp_num = peer.qpn;
        a.rq_psn = peer.psn;
        a.ah_attr.is_global = 1;
        a.ah_attr.port_num = port;
        a.ah_attr.grh.dgid = peer.gid;
        a.ah_attr.grh.sgid_index = sgid_index;
        a.ah_attr.grh.hop_limit = 1;
        // SAFETY: live queue pair.
        let reliable = unsafe { (*self.raw).qp_type } == ibv_qp_type::RC;
        // RC needs its acknowledgement and retry settings; UC has none.
        let (rc_rtr, rc_rts) = if reliable {
            a.max_dest_rd_atomic = 1;
            a.min_rnr_timer = 12;
            a.max_rd_atomic = 1;
            a.timeout = 14;
            a.retry_cnt = 7;
            a.rnr_retry = 7;
            (
                qp_attr_mask::MAX_DEST_RD_ATOMIC | qp_attr_mask::MIN_RNR_TIMER,
                qp_attr_mask::MAX_QP_RD_ATOMIC
                    | qp_attr_mask::TIMEOUT
                    | qp_attr_mask::RETRY_CNT
                    | qp_attr_mask::RNR_RETRY,
            )
        } else {
            (0, 0)
        };
        self.modify(
            &mut a,
            qp_attr_mask::STATE
                | qp_attr_mask::AV
                | qp_attr_mask::PATH_MTU
                | qp_attr_mask::DEST_QPN
                | qp_attr_mask::RQ_PSN
                | rc_rtr,
            "ibv_modify_qp(RTR)",
        )?;
        a.qp_state = ibv_qp_state::RTS;
        a.sq_psn = local_psn;
        self.modify(
            &mut a,
            qp_attr_mask::STATE | qp_attr_mask::SQ_PSN | rc_rts,
            "ibv_modify_qp(RTS)",
        )
    }

    /// Posts a signaled SEND of `mr[range]`, within the work-request budget.
    ///
    /// # Errors
    /// [`Error::Verb`] (ENOMEM) when the budget is spent; the errno of `ibv_post_send`.
    pub fn post_send(
        &self,
        wr_id: u64,
        mr: &MemoryRegion,
        range: std::ops::Range<usize>,
    ) -> Result<()> {
        let mut out = self.outstanding.lock().unwrap_or_else(|e| e.into_inner());
        if out.0 >= self.max.0 {
            return Err(Error::Verb {
                verb: "ibv_post_send (the work-request budget is spent)",
                source: std::io::Error::from_raw_os_error(libc::ENOMEM),
            });
        }
        let mut sge = mr.sge(range);
        let mut wr = ibv_send_wr::send(wr_id, &mut sge);
        let mut bad = std::ptr::null_mut();
        // SAFETY: live queue pair; the SGE points into `mr`, registered and alive; the caller
        // keeps `mr` until the completion is polled.
        match unsafe { ops::post_send(self.raw, &mut wr, &mut bad) } {
            0 => {
                out.0 += 1;
                Ok(())
            }
            rc => Err(verb_error("ibv_post_send", rc)),
        }
    }

    /// Posts a receive into `mr[range]`, within the work-request budget.
    ///
    /// # Errors
    /// As [`QueuePair::post_send`].
    pub fn post_recv(
        &self,
        wr_id: u64,
        mr: &MemoryRegion,
        range: std::ops::Range<usize>,
    ) -> Result<()> {
        let mut out = self.outstanding.lock().unwrap_or_else(|e| e.into_inner());
        if out.1 >= self.max.1 {
            return Err(Error::Verb {
                verb: "ibv_post_recv (the work-request budget is spent)",
                source: std::io::Error::from_raw_os_error(libc::ENOMEM),
            });
        }
        let mut sge = mr.sge(range);
        let mut wr = ibv_recv_wr {
            wr_id,
            next: std::ptr::null_mut(),
            sg_list: &mut sge,
            num_sge: 1,
        };
        let mut bad = std::ptr::null_mut();
        // SAFETY: as for `post_send`.
        match unsafe { ops::post_recv(self.raw, &mut wr, &mut bad) } {
            0 => {
                out.1 += 1;
                Ok(())
            }
            rc => Err(verb_error("ibv_post_recv", rc)),
        }
    }

    /// Releases budget for completions polled: `sends` and `recvs` of this queue pair finished.
    pub fn completed(&self, sends: usize, recvs: usize) {
        let mut out = self.outstanding.lock().unwrap_or_else(|e| e.into_inner());
        out.0 = out.0.saturating_sub(sends);
        out.1 = out.1.saturating_sub(recvs);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Node {
        ctx: Context,
        pd: ProtectionDomain,
        cq: CompletionQueue,
        qp: QueuePair,
        gid: Gid,
    }

    /// Polls until something completes (the software fabric delivers on its own threads), for at
    /// most five seconds.
    fn poll_some(cq: &CompletionQueue, wc: &mut [ibv_wc]) -> usize {
        let end = std::time::Instant::now() + std::time::Duration::from_secs(5);
        loop {
            let n = cq.poll(wc).unwrap();
            if n > 0 || std::time::Instant::now() > end {
                return n;
            }
            std::thread::sleep(std::time::Duration::from_micros(200));
        }
    }

    fn node() -> Node {
        node_on(Arc::new(Verbs::software()), None)
    }

    fn node_on(verbs: Arc<Verbs>, name: Option<&str>) -> Node {
        let ctx = Context::open(verbs, name).unwrap();
        let port = ctx.query_port(1).unwrap();
        let gid = ctx.ipv4_gid(1).unwrap();
        let pd = ctx.alloc_pd().unwrap();
        let cq = ctx.create_cq(256).unwrap();
        let qp = pd.create_qp(&cq, 64, 64, port.link_layer).unwrap();
        Node {
            ctx,
            pd,
            cq,
            qp,
            gid,
        }
    }

    #[test]
    fn two_nodes_connect_by_ipv4_gid_and_exchange_a_message() {
        let (a, b) = (node(), node());
        assert_eq!(
            a.gid.index, 1,
            "the IPv4-mapped GID is found by scanning, not assumed"
        );
        exchange(&a, &b);
    }

    /// Opt-in real hardware: `SINEW_RDMA_DEVICE=mlx5_0` (`rxe0` for soft-RoCE, `rdma_en2` on a
    /// Mac) runs the exchange over that device's loopback.
    #[test]
    fn two_queue_pairs_on_the_device_named_by_sinew_rdma_device_exchange_a_message() {
        let Some(name) = std::env::var("SINEW_RDMA_DEVICE")
            .ok()
            .filter(|d| !d.is_empty() && d != "softrdma0")
        else {
            eprintln!("skipped: set SINEW_RDMA_DEVICE to a hardware device to run this");
            return;
        };
        let verbs = Arc::new(Verbs::load().expect("SINEW_RDMA_DEVICE is set: the verbs library"));
        let (a, b) = (
            node_on(verbs.clone(), Some(&name)),
            node_on(verbs, Some(&name)),
        );
        exchange(&a, &b);
    }

    fn exchange(a: &Node, b: &Node) {
        let ea = Endpoint {
            gid: a.gid.gid,
            qpn: a.qp.qpn(),
            psn: 1,
        };
        let eb = Endpoint {
            gid: b.gid.gid,
            qpn: b.qp.qpn(),
            psn: 2,
        };
        a.qp.connect(1, a.gid.index, 1, eb).unwrap();
        b.qp.connect(1, b.gid.index, 2, ea).unwrap();
        let mut tx = a.pd.register(8192).unwrap();
        let rx = b.pd.register(8192).unwrap();
        tx.bytes_mut()[..6].copy_from_slice(b"sinew!");
        b.qp.post_recv(1, &rx, 0..4096).unwrap();
        a.qp.post_send(2, &tx, 0..6).unwrap();
        let mut wc = [ibv_wc::default(); 4];
        assert_eq!(poll_some(&a.cq, &mut wc), 1);
        assert_eq!(poll_some(&b.cq, &mut wc), 1);
        assert_eq!((wc[0].wr_id, wc[0].byte_len), (1, 6));
        assert_eq!(&rx.bytes()[..6], b"sinew!");
        assert!(a.ctx.query_device().unwrap().max_mr >= 1);
    }

    #[test]
    fn budgets_are_enforced_before_the_verb() {
        let n = node();
        let mrs: Vec<_> = (0..MR_BUDGET).map(|_| n.pd.register(64).unwrap()).collect();
        assert!(n.pd.register(64).is_err(), "the memory-region budget");
        drop(mrs);
        assert!(
            n.pd.register(64).is_ok(),
            "dropping regions returns the budget"
        );
        let peer = node();
        let ep = Endpoint {
            gid: peer.gid.gid,
            qpn: peer.qp.qpn(),
            psn: 0,
        };
        let en = Endpoint {
            gid: n.gid.gid,
            qpn: n.qp.qpn(),
            psn: 0,
        };
        n.qp.connect(1, n.gid.index, 0, ep).unwrap();
        peer.qp.connect(1, peer.gid.index, 0, en).unwrap();
        let mr = n.pd.register(4096).unwrap();
        for i in 0..64 {
            n.qp.post_recv(i, &mr, 0..4096).unwrap();
        }
        assert!(
            n.qp.post_recv(64, &mr, 0..4096).is_err(),
            "the receive budget"
        );
        // A message consumes a receive; its polled completion returns the budget.
        let tx = peer.pd.register(64).unwrap();
        peer.qp.post_send(1, &tx, 0..8).unwrap();
        let mut wc = [ibv_wc::default(); 4];
        assert_eq!(poll_some(&n.cq, &mut wc), 1);
        n.qp.completed(0, 1);
        assert!(n.qp.post_recv(65, &mr, 0..4096).is_ok());
    }

    #[test]
    fn a_failed_completion_is_an_error() {
        let (a, b) = (node(), node());
        let eb = Endpoint {
            gid: b.gid.gid,
            qpn: b.qp.qpn(),
            psn: 0,
        };
        a.qp.connect(1, a.gid.index, 0, eb).unwrap();
        let mr = a.pd.register(4096).unwrap();
        // A work request whose key the provider does not know completes with an error status.
        let mut sge = ibv_sge {
            addr: mr.bytes().as_ptr() as u64,
            length: 8,
            lkey: 0xdead,
        };
        let mut wr = ibv_send_wr::send(5, &mut sge);
        let mut bad = std::ptr::null_mut();
        // SAFETY: live queue pair; the SGE's memory is alive (its key is deliberately wrong).
        assert_eq!(unsafe { ops::post_send(a.qp.raw, &mut wr, &mut bad) }, 0);
        let mut wc = [ibv_wc::default(); 4];
        let err = a.cq.poll(&mut wc).unwrap_err();
        assert!(err.to_string().contains("status 4"), "{err}");
    }
}
