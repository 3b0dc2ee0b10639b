//! `repr(C)` verbs types, the subset sinew uses, laid out as `<infiniband/verbs.h>` lays them out
//! (checked by the layout tests against the real header where it is installed).
//!
//! Enumerations are integer newtypes with constants, never Rust enums: a provider may return a
//! value this crate does not name (Apple adds 100, Thunderbolt, to the transport and link-layer
//! enumerations), and an unknown value in a Rust enum would be undefined behaviour. Structs whose
//! tails differ between platforms (they embed `pthread_mutex_t`) are declared only up to the
//! fields sinew reads, and are only ever handled through pointers the library returns.

#![allow(non_camel_case_types)]

use std::ffi::{c_int, c_uint, c_void};

macro_rules! int_enum {
    ($(#[$doc:meta])* $name:ident($repr:ty) { $($(#[$vdoc:meta])* $variant:ident = $value:expr),* $(,)? }) => {
        $(#[$doc])*
        #[repr(transparent)]
        #[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
        pub struct $name(pub $repr);
        impl $name {
            $($(#[$vdoc])* pub const $variant: $name = $name($value);)*
        }
    };
}

int_enum!(
    /// `enum ibv_qp_type`.
    ibv_qp_type(u32) {
        /// Reliable connection.
        RC = 2,
        /// Unreliable connection (the only kind Apple's provider creates).
        UC = 3,
        /// Unreliable datagram.
        UD = 4,
    }
);

int_enum!(
    /// `enum ibv_qp_state`.
    ibv_qp_state(u32) {
        /// Reset.
        RESET = 0,
        /// Initialised.
        INIT = 1,
        /// Ready to receive.
        RTR = 2,
        /// Ready to send.
        RTS = 3,
        /// Send queue drained.
        SQD = 4,
        /// Send queue error.
        SQE = 5,
        /// Error.
        ERR = 6,
    }
);

int_enum!(
    /// `enum ibv_wr_opcode`.
    ibv_wr_opcode(u32) {
        /// RDMA write.
        RDMA_WRITE = 0,
        /// RDMA write with immediate data.
        RDMA_WRITE_WITH_IMM = 1,
        /// Send.
        SEND = 2,
        /// Send with immediate data.
        SEND_WITH_IMM = 3,
        /// RDMA read.
        RDMA_READ = 4,
    }
);

int_enum!(
    /// `enum ibv_wc_status`: every completion's status must be checked.
    ibv_wc_status(u32) {
        /// Success.
        SUCCESS = 0,
        /// Local length error (a receive too short for the send, a frame mismatch).
        LOC_LEN_ERR = 1,
        /// Local QP operation error.
        LOC_QP_OP_ERR = 2,
        /// Local protection error.
        LOC_PROT_ERR = 4,
        /// Flushed after the QP entered the error state.
        WR_FLUSH_ERR = 5,
        /// Remote access error.
        REM_ACCESS_ERR = 10,
        /// Transport retries exceeded.
        RETRY_EXC_ERR = 12,
        /// General error.
        GENERAL_ERR = 21,
    }
);

int_enum!(
    /// `enum ibv_wc_opcode`.
    ibv_wc_opcode(u32) {
        /// A send completed.
        SEND = 0,
        /// A receive completed.
        RECV = 128,
    }
);

int_enum!(
    /// `enum ibv_mtu`.
    ibv_mtu(u32) {
        /// 256 bytes.
        MTU_256 = 1,
        /// 512 bytes.
        MTU_512 = 2,
        /// 1024 bytes.
        MTU_1024 = 3,
        /// 2048 bytes.
        MTU_2048 = 4,
        /// 4096 bytes.
        MTU_4096 = 5,
    }
);

int_enum!(
    /// `enum ibv_port_state`.
    ibv_port_state(u32) {
        /// Down.
        DOWN = 1,
        /// Initialising.
        INIT = 2,
        /// Armed.
        ARMED = 3,
        /// Active.
        ACTIVE = 4,
    }
);

int_enum!(
    /// `enum ibv_transport_type`.
    ibv_transport_type(i32) {
        /// InfiniBand.
        IB = 0,
        /// iWARP.
        IWARP = 1,
        /// Thunderbolt (Apple's provider).
        THUNDERBOLT = 100,
    }
);

int_enum!(
    /// The port's link layer (`IBV_LINK_LAYER_*`), a byte in `ibv_port_attr`.
    ibv_link_layer(u8) {
        /// Unspecified.
        UNSPECIFIED = 0,
        /// InfiniBand.
        INFINIBAND = 1,
        /// Ethernet (RoCE, soft-RoCE).
        ETHERNET = 2,
        /// Thunderbolt (Apple's provider).
        THUNDERBOLT = 100,
    }
);

/// `enum ibv_access_flags` bits.
pub mod access {
    /// Local write.
    pub const LOCAL_WRITE: u32 = 1;
    /// Remote write.
    pub const REMOTE_WRITE: u32 = 1 << 1;
    /// Remote read.
    pub const REMOTE_READ: u32 = 1 << 2;
}

/// `enum ibv_send_flags` bits.
pub mod send_flags {
    /// Generate a completion for this work request.
    pub const SIGNALED: u32 = 1 << 1;
    /// Payload inline in the work request.
    pub const INLINE: u32 = 1 << 3;
}

/// `enum ibv_qp_attr_mask` bits.
pub mod qp_attr_mask {
    /// `qp_state`.
    pub const STATE: i32 = 1;
    /// `qp_access_flags`.
    pub const ACCESS_FLAGS: i32 = 1 << 3;
    /// `pkey_index`.
    pub const PKEY_INDEX: i32 = 1 << 4;
    /// `port_num`.
    pub const PORT: i32 = 1 << 5;
    /// `ah_attr`.
    pub const AV: i32 = 1 << 7;
    /// `path_mtu`.
    pub const PATH_MTU: i32 = 1 << 8;
    /// `sq_psn`.
    pub const SQ_PSN: i32 = 1 << 16;
    /// `rq_psn`.
    pub const RQ_PSN: i32 = 1 << 12;
    /// `dest_qp_num`.
    pub const DEST_QPN: i32 = 1 << 20;
    /// `max_rd_atomic` (RC, RTS).
    pub const MAX_QP_RD_ATOMIC: i32 = 1 << 9;
    /// `min_rnr_timer` (RC, RTR).
    pub const MIN_RNR_TIMER: i32 = 1 << 11;
    /// `timeout` (RC, RTS).
    pub const TIMEOUT: i32 = 1 << 13;
    /// `retry_cnt` (RC, RTS).
    pub const RETRY_CNT: i32 = 1 << 14;
    /// `rnr_retry` (RC, RTS).
    pub const RNR_RETRY: i32 = 1 << 15;
    /// `max_dest_rd_atomic` (RC, RTR).
    pub const MAX_DEST_RD_ATOMIC: i32 = 1 << 17;
}

/// `struct ibv_device`: opaque, only handled by pointer.
#[repr(C)]
pub struct ibv_device {
    _opaque: [u8; 0],
}

/// `struct ibv_comp_channel`: opaque.
#[repr(C)]
pub struct ibv_comp_channel {
    _opaque: [u8; 0],
}

/// `struct ibv_srq`: opaque.
#[repr(C)]
pub struct ibv_srq {
    _opaque: [u8; 0],
}

/// `struct ibv_ah`: opaque.
#[repr(C)]
pub struct ibv_ah {
    _opaque: [u8; 0],
}

/// `union ibv_gid`: 16 bytes, 8-aligned.
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ibv_gid {
    /// The raw bytes (network order).
    pub raw: [u8; 16],
}

/// `struct ibv_sge`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct ibv_sge {
    /// Address.
    pub addr: u64,
    /// Length in bytes.
    pub length: u32,
    /// Local key of the memory region.
    pub lkey: u32,
}

/// `struct ibv_send_wr`. The unions are raw storage; sinew posts SEND only.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct ibv_send_wr {
    /// Caller's id, returned in the completion.
    pub wr_id: u64,
    /// Next work request in a list.
    pub next: *mut ibv_send_wr,
    /// Scatter/gather list.
    pub sg_list: *mut ibv_sge,
    /// Entries in `sg_list`.
    pub num_sge: c_int,
    /// Operation.
    pub opcode: ibv_wr_opcode,
    /// [`send_flags`] bits.
    pub send_flags: c_uint,
    /// Immediate data (network order) or invalidated rkey.
    pub imm_data: u32,
    /// `wr` union: rdma / atomic / ud.
    pub wr: [u64; 4],
    /// `qp_type` union (xrc remote srqn) and padding.
    pub qp_type: [u32; 2],
    /// `bind_mw` / `tso` union.
    pub bind_mw: [u64; 6],
}

impl ibv_send_wr {
    /// A signaled SEND of one SGE.
    pub fn send(wr_id: u64, sge: *mut ibv_sge) -> Self {
        ibv_send_wr {
            wr_id,
            next: std::ptr::null_mut(),
            sg_list: sge,
            num_sge: 1,
            opcode: ibv_wr_opcode::SEND,
            send_flags: send_flags::SIGNALED,
            imm_data: 0,
            wr: [0; 4],
            qp_type: [0; 2],
            bind_mw: [0; 6],
        }
    }
}

/// `struct ibv_recv_wr`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct ibv_recv_wr {
    /// Caller's id, returned in the completion.
    pub wr_id: u64,
    /// Next work request in a list.
    pub next: *mut ibv_recv_wr,
    /// Scatter/gather list.
    pub sg_list: *mut ibv_sge,
    /// Entries in `sg_list`.
    pub num_sge: c_int,
}

/// `struct ibv_wc`: a work completion.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct ibv_wc {
    /// The work request's id.
    pub wr_id: u64,
    /// Status: anything but SUCCESS is a failure.
    pub status: ibv_wc_status,
    /// What completed.
    pub opcode: ibv_wc_opcode,
    /// Provider-specific error.
    pub vendor_err: u32,
    /// Bytes received.
    pub byte_len: u32,
    /// Immediate data or invalidated rkey.
    pub imm_data: u32,
    /// Local QP number.
    pub qp_num: u32,
    /// Remote QP (UD).
    pub src_qp: u32,
    /// Completion flags.
    pub wc_flags: c_uint,
    /// P_Key index (UD).
    pub pkey_index: u16,
    /// Source LID (UD).
    pub slid: u16,
    /// Service level.
    pub sl: u8,
    /// DLID path bits.
    pub dlid_path_bits: u8,
}

/// `struct ibv_qp_cap`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct ibv_qp_cap {
    /// Outstanding send work requests.
    pub max_send_wr: u32,
    /// Outstanding receive work requests.
    pub max_recv_wr: u32,
    /// SGEs per send.
    pub max_send_sge: u32,
    /// SGEs per receive.
    pub max_recv_sge: u32,
    /// Inline bytes.
    pub max_inline_data: u32,
}

/// `struct ibv_global_route`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct ibv_global_route {
    /// Destination GID.
    pub dgid: ibv_gid,
    /// Flow label.
    pub flow_label: u32,
    /// Source GID index.
    pub sgid_index: u8,
    /// Hop limit.
    pub hop_limit: u8,
    /// Traffic class.
    pub traffic_class: u8,
}

/// `struct ibv_ah_attr`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct ibv_ah_attr {
    /// Global route (used when `is_global`).
    pub grh: ibv_global_route,
    /// Destination LID.
    pub dlid: u16,
    /// Service level.
    pub sl: u8,
    /// Source path bits.
    pub src_path_bits: u8,
    /// Static rate.
    pub static_rate: u8,
    /// Whether `grh` is used (always on RoCE and Thunderbolt: the peer is addressed by GID).
    pub is_global: u8,
    /// Port.
    pub port_num: u8,
}

/// `struct ibv_qp_attr`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct ibv_qp_attr {
    /// Target state.
    pub qp_state: ibv_qp_state,
    /// Current state.
    pub cur_qp_state: ibv_qp_state,
    /// Path MTU.
    pub path_mtu: ibv_mtu,
    /// Migration state.
    pub path_mig_state: u32,
    /// Q_Key (UD).
    pub qkey: u32,
    /// Receive PSN.
    pub rq_psn: u32,
    /// Send PSN.
    pub sq_psn: u32,
    /// Remote QP number.
    pub dest_qp_num: u32,
    /// [`access`] bits.
    pub qp_access_flags: c_uint,
    /// Capacities.
    pub cap: ibv_qp_cap,
    /// Address vector.
    pub ah_attr: ibv_ah_attr,
    /// Alternate address vector.
    pub alt_ah_attr: ibv_ah_attr,
    /// P_Key index.
    pub pkey_index: u16,
    /// Alternate P_Key index.
    pub alt_pkey_index: u16,
    /// SQD async notify.
    pub en_sqd_async_notify: u8,
    /// SQ draining.
    pub sq_draining: u8,
    /// Max outstanding RDMA reads/atomics as initiator.
    pub max_rd_atomic: u8,
    /// Max outstanding RDMA reads/atomics as target.
    pub max_dest_rd_atomic: u8,
    /// Minimum RNR NAK timer.
    pub min_rnr_timer: u8,
    /// Port.
    pub port_num: u8,
    /// Local ACK timeout.
    pub timeout: u8,
    /// Retry count.
    pub retry_cnt: u8,
    /// RNR retry count.
    pub rnr_retry: u8,
    /// Alternate port.
    pub alt_port_num: u8,
    /// Alternate timeout.
    pub alt_timeout: u8,
    /// Rate limit (kbps).
    pub rate_limit: u32,
}

/// `struct ibv_qp_init_attr`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct ibv_qp_init_attr {
    /// Caller's context.
    pub qp_context: *mut c_void,
    /// Send completion queue.
    pub send_cq: *mut ibv_cq,
    /// Receive completion queue.
    pub recv_cq: *mut ibv_cq,
    /// Shared receive queue.
    pub srq: *mut ibv_srq,
    /// Capacities.
    pub cap: ibv_qp_cap,
    /// QP type.
    pub qp_type: ibv_qp_type,
    /// Signal every send.
    pub sq_sig_all: c_int,
}

/// `struct ibv_port_attr`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct ibv_port_attr {
    /// Port state.
    pub state: ibv_port_state,
    /// Largest MTU.
    pub max_mtu: ibv_mtu,
    /// Active MTU.
    pub active_mtu: ibv_mtu,
    /// Entries in the GID table.
    pub gid_tbl_len: c_int,
    /// Capability flags.
    pub port_cap_flags: u32,
    /// Largest message.
    pub max_msg_sz: u32,
    /// Bad P_Key counter.
    pub bad_pkey_cntr: u32,
    /// Q_Key violation counter.
    pub qkey_viol_cntr: u32,
    /// P_Key table length.
    pub pkey_tbl_len: u16,
    /// LID.
    pub lid: u16,
    /// Subnet manager LID.
    pub sm_lid: u16,
    /// LMC.
    pub lmc: u8,
    /// VLs.
    pub max_vl_num: u8,
    /// SM service level.
    pub sm_sl: u8,
    /// Subnet timeout.
    pub subnet_timeout: u8,
    /// Init type reply.
    pub init_type_reply: u8,
    /// Active width.
    pub active_width: u8,
    /// Active speed.
    pub active_speed: u8,
    /// Physical state.
    pub phys_state: u8,
    /// Link layer.
    pub link_layer: ibv_link_layer,
    /// Flags.
    pub flags: u8,
    /// More capability flags.
    pub port_cap_flags2: u16,
}

/// `struct ibv_device_attr`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct ibv_device_attr {
    /// Firmware version, NUL-terminated.
    pub fw_ver: [u8; 64],
    /// Node GUID (network order).
    pub node_guid: u64,
    /// System image GUID.
    pub sys_image_guid: u64,
    /// Largest memory region.
    pub max_mr_size: u64,
    /// Supported page sizes.
    pub page_size_cap: u64,
    /// Vendor.
    pub vendor_id: u32,
    /// Part.
    pub vendor_part_id: u32,
    /// Hardware version.
    pub hw_ver: u32,
    /// Queue pairs.
    pub max_qp: c_int,
    /// Outstanding work requests per queue.
    pub max_qp_wr: c_int,
    /// Capability flags.
    pub device_cap_flags: c_uint,
    /// SGEs per work request.
    pub max_sge: c_int,
    /// SGEs per RDMA read.
    pub max_sge_rd: c_int,
    /// Completion queues.
    pub max_cq: c_int,
    /// Entries per completion queue.
    pub max_cqe: c_int,
    /// Memory regions.
    pub max_mr: c_int,
    /// Protection domains.
    pub max_pd: c_int,
    /// The remaining limits, in header order, up to `atomic_cap`.
    pub max_qp_rd_atom: c_int,
    /// Header field.
    pub max_ee_rd_atom: c_int,
    /// Header field.
    pub max_res_rd_atom: c_int,
    /// Header field.
    pub max_qp_init_rd_atom: c_int,
    /// Header field.
    pub max_ee_init_rd_atom: c_int,
    /// Atomic capability (an enum).
    pub atomic_cap: u32,
    /// The remaining limits, in header order.
    pub max_ee: c_int,
    /// Header field.
    pub max_rdd: c_int,
    /// Header field.
    pub max_mw: c_int,
    /// Header field.
    pub max_raw_ipv6_qp: c_int,
    /// Header field.
    pub max_raw_ethy_qp: c_int,
    /// Header field.
    pub max_mcast_grp: c_int,
    /// Header field.
    pub max_mcast_qp_attach: c_int,
    /// Header field.
    pub max_total_mcast_qp_attach: c_int,
    /// Header field.
    pub max_ah: c_int,
    /// Header field.
    pub max_fmr: c_int,
    /// Header field.
    pub max_map_per_fmr: c_int,
    /// Header field.
    pub max_srq: c_int,
    /// Header field.
    pub max_srq_wr: c_int,
    /// Header field.
    pub max_srq_sge: c_int,
    /// P_Keys.
    pub max_pkeys: u16,
    /// Local CA ACK delay.
    pub local_ca_ack_delay: u8,
    /// Physical ports.
    pub phys_port_cnt: u8,
}

/// `poll_cq` in the context's ops table.
pub type poll_cq_fn =
    unsafe extern "C" fn(cq: *mut ibv_cq, num_entries: c_int, wc: *mut ibv_wc) -> c_int;
/// `req_notify_cq` in the context's ops table.
pub type req_notify_cq_fn = unsafe extern "C" fn(cq: *mut ibv_cq, solicited_only: c_int) -> c_int;
/// `post_send` in the context's ops table.
pub type post_send_fn = unsafe extern "C" fn(
    qp: *mut ibv_qp,
    wr: *mut ibv_send_wr,
    bad_wr: *mut *mut ibv_send_wr,
) -> c_int;
/// `post_recv` in the context's ops table.
pub type post_recv_fn = unsafe extern "C" fn(
    qp: *mut ibv_qp,
    wr: *mut ibv_recv_wr,
    bad_wr: *mut *mut ibv_recv_wr,
) -> c_int;

/// `struct ibv_context_ops`: 32 function pointers; the data path calls the four named ones
/// (`post_send`, `post_recv`, `poll_cq`, `req_notify_cq` are `static inline` in the header on
/// both platforms and call through this table).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct ibv_context_ops {
    _before_poll_cq: [Option<unsafe extern "C" fn()>; 11],
    /// Polls a completion queue.
    pub poll_cq: Option<poll_cq_fn>,
    /// Requests a completion notification.
    pub req_notify_cq: Option<req_notify_cq_fn>,
    _before_post_send: [Option<unsafe extern "C" fn()>; 12],
    /// Posts send work requests.
    pub post_send: Option<post_send_fn>,
    /// Posts receive work requests.
    pub post_recv: Option<post_recv_fn>,
    _rest: [Option<unsafe extern "C" fn()>; 5],
}

/// `struct ibv_context`, up to its ops table (the tail holds a platform-specific mutex).
#[repr(C)]
pub struct ibv_context {
    /// The device.
    pub device: *mut ibv_device,
    /// The provider's operations.
    pub ops: ibv_context_ops,
}

/// `struct ibv_pd`, prefix.
#[repr(C)]
pub struct ibv_pd {
    /// Owning context.
    pub context: *mut ibv_context,
    /// Kernel handle.
    pub handle: u32,
}

/// `struct ibv_cq`, prefix.
#[repr(C)]
pub struct ibv_cq {
    /// Owning context.
    pub context: *mut ibv_context,
    /// Completion channel.
    pub channel: *mut ibv_comp_channel,
    /// Caller's context.
    pub cq_context: *mut c_void,
    /// Kernel handle.
    pub handle: u32,
    /// Entries.
    pub cqe: c_int,
}

/// `struct ibv_qp`, prefix.
#[repr(C)]
pub struct ibv_qp {
    /// Owning context.
    pub context: *mut ibv_context,
    /// Caller's context.
    pub qp_context: *mut c_void,
    /// Protection domain.
    pub pd: *mut ibv_pd,
    /// Send completion queue.
    pub send_cq: *mut ibv_cq,
    /// Receive completion queue.
    pub recv_cq: *mut ibv_cq,
    /// Shared receive queue.
    pub srq: *mut ibv_srq,
    /// Kernel handle.
    pub handle: u32,
    /// QP number, exchanged with the peer.
    pub qp_num: u32,
    /// State.
    pub state: ibv_qp_state,
    /// Type.
    pub qp_type: ibv_qp_type,
}

/// `struct ibv_mr`.
#[repr(C)]
pub struct ibv_mr {
    /// Owning context.
    pub context: *mut ibv_context,
    /// Protection domain.
    pub pd: *mut ibv_pd,
    /// Start.
    pub addr: *mut c_void,
    /// Length.
    pub length: usize,
    /// Kernel handle.
    pub handle: u32,
    /// Local key, for SGEs.
    pub lkey: u32,
    /// Remote key.
    pub rkey: u32,
}

#[cfg(all(test, verbs_header))]
mod layout {
    use super::*;
    use std::ffi::{CString, c_char};
    use std::mem::{offset_of, size_of};

    unsafe extern "C" {
        fn sinew_verbs_size(name: *const c_char) -> usize;
        fn sinew_verbs_offset(name: *const c_char) -> usize;
    }

    fn c_size(name: &str) -> usize {
        let n = CString::new(name).unwrap();
        // SAFETY: the probe only reads the NUL-terminated name.
        let v = unsafe { sinew_verbs_size(n.as_ptr()) };
        assert_ne!(v, usize::MAX, "the probe does not know {name}");
        v
    }

    fn c_offset(name: &str) -> usize {
        let n = CString::new(name).unwrap();
        // SAFETY: the probe only reads the NUL-terminated name.
        let v = unsafe { sinew_verbs_offset(n.as_ptr()) };
        assert_ne!(v, usize::MAX, "the probe does not know {name}");
        v
    }

    #[test]
    fn sizes_match_the_installed_header() {
        let ours = [
            ("struct ibv_sge", size_of::<ibv_sge>()),
            ("struct ibv_send_wr", size_of::<ibv_send_wr>()),
            ("struct ibv_recv_wr", size_of::<ibv_recv_wr>()),
            ("struct ibv_wc", size_of::<ibv_wc>()),
            ("struct ibv_qp_cap", size_of::<ibv_qp_cap>()),
            ("struct ibv_qp_attr", size_of::<ibv_qp_attr>()),
            ("struct ibv_qp_init_attr", size_of::<ibv_qp_init_attr>()),
            ("struct ibv_ah_attr", size_of::<ibv_ah_attr>()),
            ("struct ibv_global_route", size_of::<ibv_global_route>()),
            ("union ibv_gid", size_of::<ibv_gid>()),
            ("struct ibv_port_attr", size_of::<ibv_port_attr>()),
            ("struct ibv_device_attr", size_of::<ibv_device_attr>()),
            ("struct ibv_context_ops", size_of::<ibv_context_ops>()),
            ("struct ibv_mr", size_of::<ibv_mr>()),
        ];
        for (name, size) in ours {
            assert_eq!(size, c_size(name), "size of {name}");
        }
    }

    #[test]
    fn field_offsets_match_the_installed_header() {
        let ours = [
            ("struct ibv_context.device", offset_of!(ibv_context, device)),
            ("struct ibv_context.ops", offset_of!(ibv_context, ops)),
            (
                "struct ibv_context_ops.poll_cq",
                offset_of!(ibv_context_ops, poll_cq),
            ),
            (
                "struct ibv_context_ops.req_notify_cq",
                offset_of!(ibv_context_ops, req_notify_cq),
            ),
            (
                "struct ibv_context_ops.post_send",
                offset_of!(ibv_context_ops, post_send),
            ),
            (
                "struct ibv_context_ops.post_recv",
                offset_of!(ibv_context_ops, post_recv),
            ),
            ("struct ibv_pd.context", offset_of!(ibv_pd, context)),
            ("struct ibv_pd.handle", offset_of!(ibv_pd, handle)),
            ("struct ibv_cq.context", offset_of!(ibv_cq, context)),
            ("struct ibv_cq.cqe", offset_of!(ibv_cq, cqe)),
            ("struct ibv_qp.context", offset_of!(ibv_qp, context)),
            ("struct ibv_qp.pd", offset_of!(ibv_qp, pd)),
            ("struct ibv_qp.send_cq", offset_of!(ibv_qp, send_cq)),
            ("struct ibv_qp.recv_cq", offset_of!(ibv_qp, recv_cq)),
            ("struct ibv_qp.handle", offset_of!(ibv_qp, handle)),
            ("struct ibv_qp.qp_num", offset_of!(ibv_qp, qp_num)),
            ("struct ibv_qp.state", offset_of!(ibv_qp, state)),
            ("struct ibv_qp.qp_type", offset_of!(ibv_qp, qp_type)),
            ("struct ibv_mr.lkey", offset_of!(ibv_mr, lkey)),
            ("struct ibv_mr.rkey", offset_of!(ibv_mr, rkey)),
            ("struct ibv_mr.length", offset_of!(ibv_mr, length)),
            (
                "struct ibv_send_wr.num_sge",
                offset_of!(ibv_send_wr, num_sge),
            ),
            ("struct ibv_send_wr.opcode", offset_of!(ibv_send_wr, opcode)),
            (
                "struct ibv_send_wr.send_flags",
                offset_of!(ibv_send_wr, send_flags),
            ),
            ("struct ibv_send_wr.wr", offset_of!(ibv_send_wr, wr)),
            (
                "struct ibv_recv_wr.num_sge",
                offset_of!(ibv_recv_wr, num_sge),
            ),
            ("struct ibv_wc.status", offset_of!(ibv_wc, status)),
            ("struct ibv_wc.byte_len", offset_of!(ibv_wc, byte_len)),
            ("struct ibv_wc.qp_num", offset_of!(ibv_wc, qp_num)),
            ("struct ibv_qp_attr.cap", offset_of!(ibv_qp_attr, cap)),
            (
                "struct ibv_qp_attr.ah_attr",
                offset_of!(ibv_qp_attr, ah_attr),
            ),
            (
                "struct ibv_qp_attr.pkey_index",
                offset_of!(ibv_qp_attr, pkey_index),
            ),
            (
                "struct ibv_qp_attr.port_num",
                offset_of!(ibv_qp_attr, port_num),
            ),
            (
                "struct ibv_qp_attr.rate_limit",
                offset_of!(ibv_qp_attr, rate_limit),
            ),
            (
                "struct ibv_qp_init_attr.cap",
                offset_of!(ibv_qp_init_attr, cap),
            ),
            (
                "struct ibv_qp_init_attr.qp_type",
                offset_of!(ibv_qp_init_attr, qp_type),
            ),
            ("struct ibv_ah_attr.dlid", offset_of!(ibv_ah_attr, dlid)),
            (
                "struct ibv_ah_attr.is_global",
                offset_of!(ibv_ah_attr, is_global),
            ),
            (
                "struct ibv_ah_attr.port_num",
                offset_of!(ibv_ah_attr, port_num),
            ),
            (
                "struct ibv_global_route.flow_label",
                offset_of!(ibv_global_route, flow_label),
            ),
            (
                "struct ibv_global_route.sgid_index",
                offset_of!(ibv_global_route, sgid_index),
            ),
            (
                "struct ibv_port_attr.gid_tbl_len",
                offset_of!(ibv_port_attr, gid_tbl_len),
            ),
            (
                "struct ibv_port_attr.max_msg_sz",
                offset_of!(ibv_port_attr, max_msg_sz),
            ),
            ("struct ibv_port_attr.lid", offset_of!(ibv_port_attr, lid)),
            (
                "struct ibv_port_attr.link_layer",
                offset_of!(ibv_port_attr, link_layer),
            ),
            (
                "struct ibv_port_attr.port_cap_flags2",
                offset_of!(ibv_port_attr, port_cap_flags2),
            ),
            (
                "struct ibv_device_attr.node_guid",
                offset_of!(ibv_device_attr, node_guid),
            ),
            (
                "struct ibv_device_attr.max_qp",
                offset_of!(ibv_device_attr, max_qp),
            ),
            (
                "struct ibv_device_attr.max_qp_wr",
                offset_of!(ibv_device_attr, max_qp_wr),
            ),
            (
                "struct ibv_device_attr.max_sge",
                offset_of!(ibv_device_attr, max_sge),
            ),
            (
                "struct ibv_device_attr.max_cqe",
                offset_of!(ibv_device_attr, max_cqe),
            ),
            (
                "struct ibv_device_attr.max_mr",
                offset_of!(ibv_device_attr, max_mr),
            ),
            (
                "struct ibv_device_attr.atomic_cap",
                offset_of!(ibv_device_attr, atomic_cap),
            ),
            (
                "struct ibv_device_attr.phys_port_cnt",
                offset_of!(ibv_device_attr, phys_port_cnt),
            ),
        ];
        for (name, offset) in ours {
            assert_eq!(offset, c_offset(name), "offset of {name}");
        }
    }
}

#[cfg(all(test, not(verbs_header)))]
#[test]
fn layout_tests_need_the_verbs_header() {
    eprintln!(
        "skipped: <infiniband/verbs.h> is not installed, so the verbs layouts cannot be checked \
         here (Debian: apt-get install libibverbs-dev)"
    );
}
