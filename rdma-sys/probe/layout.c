/* Sizes and field offsets of the verbs types, from the real <infiniband/verbs.h>, so the Rust
 * definitions can be checked against the header this machine has. Built by build.rs only when
 * the header is present. */
#include <infiniband/verbs.h>
#include <stddef.h>
#include <string.h>

#define SIZE(t) if (!strcmp(name, #t)) return sizeof(t);
#define OFFSET(t, f) if (!strcmp(name, #t "." #f)) return offsetof(t, f);

size_t sinew_verbs_size(const char *name) {
    SIZE(struct ibv_sge)
    SIZE(struct ibv_send_wr)
    SIZE(struct ibv_recv_wr)
    SIZE(struct ibv_wc)
    SIZE(struct ibv_qp_cap)
    SIZE(struct ibv_qp_attr)
    SIZE(struct ibv_qp_init_attr)
    SIZE(struct ibv_ah_attr)
    SIZE(struct ibv_global_route)
    SIZE(union ibv_gid)
    SIZE(struct ibv_port_attr)
    SIZE(struct ibv_device_attr)
    SIZE(struct ibv_context_ops)
    SIZE(struct ibv_mr)
    return (size_t)-1;
}

size_t sinew_verbs_offset(const char *name) {
    OFFSET(struct ibv_context, device)
    OFFSET(struct ibv_context, ops)
    OFFSET(struct ibv_context_ops, poll_cq)
    OFFSET(struct ibv_context_ops, req_notify_cq)
    OFFSET(struct ibv_context_ops, post_send)
    OFFSET(struct ibv_context_ops, post_recv)
    OFFSET(struct ibv_pd, context)
    OFFSET(struct ibv_pd, handle)
    OFFSET(struct ibv_cq, context)
    OFFSET(struct ibv_cq, cqe)
    OFFSET(struct ibv_qp, context)
    OFFSET(struct ibv_qp, pd)
    OFFSET(struct ibv_qp, send_cq)
    OFFSET(struct ibv_qp, recv_cq)
    OFFSET(struct ibv_qp, handle)
    OFFSET(struct ibv_qp, qp_num)
    OFFSET(struct ibv_qp, state)
    OFFSET(struct ibv_qp, qp_type)
    OFFSET(struct ibv_mr, lkey)
    OFFSET(struct ibv_mr, rkey)
    OFFSET(struct ibv_mr, length)
    OFFSET(struct ibv_send_wr, num_sge)
    OFFSET(struct ibv_send_wr, opcode)
    OFFSET(struct ibv_send_wr, send_flags)
    OFFSET(struct ibv_send_wr, wr)
    OFFSET(struct ibv_recv_wr, num_sge)
    OFFSET(struct ibv_wc, status)
    OFFSET(struct ibv_wc, byte_len)
    OFFSET(struct ibv_wc, qp_num)
    OFFSET(struct ibv_qp_attr, cap)
    OFFSET(struct ibv_qp_attr, ah_attr)
    OFFSET(struct ibv_qp_attr, pkey_index)
    OFFSET(struct ibv_qp_attr, port_num)
    OFFSET(struct ibv_qp_attr, rate_limit)
    OFFSET(struct ibv_qp_init_attr, cap)
    OFFSET(struct ibv_qp_init_attr, qp_type)
    OFFSET(struct ibv_ah_attr, dlid)
    OFFSET(struct ibv_ah_attr, is_global)
    OFFSET(struct ibv_ah_attr, port_num)
    OFFSET(struct ibv_global_route, flow_label)
    OFFSET(struct ibv_global_route, sgid_index)
    OFFSET(struct ibv_port_attr, gid_tbl_len)
    OFFSET(struct ibv_port_attr, max_msg_sz)
    OFFSET(struct ibv_port_attr, lid)
    OFFSET(struct ibv_port_attr, link_layer)
    OFFSET(struct ibv_port_attr, port_cap_flags2)
    OFFSET(struct ibv_device_attr, node_guid)
    OFFSET(struct ibv_device_attr, max_qp)
    OFFSET(struct ibv_device_attr, max_qp_wr)
    OFFSET(struct ibv_device_attr, max_sge)
    OFFSET(struct ibv_device_attr, max_cqe)
    OFFSET(struct ibv_device_attr, max_mr)
    OFFSET(struct ibv_device_attr, atomic_cap)
    OFFSET(struct ibv_device_attr, phys_port_cnt)
    return (size_t)-1;
}
