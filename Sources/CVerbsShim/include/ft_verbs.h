#ifndef FT_VERBS_SHIM_H
#define FT_VERBS_SHIM_H

// A flat C surface over libibverbs. verbs.h defines much of its API as
// function-like macros and static inlines (ibv_query_port, for one, binds the
// wrong symbol when imported into Swift), so Swift only sees these functions
// and plain structs; it never includes verbs.h itself.

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct ft_verbs_device_info {
    char name[64];
    uint64_t guid;          // host byte order
    int node_type;          // enum ibv_node_type
    int transport_type;     // enum ibv_transport_type
    int phys_port_cnt;      // 0 when the device could not be opened
    int open_errno;         // errno of ibv_open_device/ibv_query_device, 0 if fine
} ft_verbs_device_info;

typedef struct ft_verbs_port_info {
    int state;              // enum ibv_port_state
    int active_mtu;         // enum ibv_mtu
    int link_layer;         // IBV_LINK_LAYER_*
    uint16_t lid;
} ft_verbs_port_info;

/// Lists RDMA devices into `out` (up to `capacity`).
/// Returns the number of devices found (which may exceed `capacity`), or -1
/// when the device list could not be read, with the errno in `*err_out`.
/// libibverbs returns NULL with ENOSYS when the kernel has no RDMA support.
int ft_verbs_list_devices(ft_verbs_device_info *out, int capacity, int *err_out);

/// Queries one port of the named device. Returns 0, or -1 with errno in `*err_out`
/// (ENODEV when no device has that name).
int ft_verbs_query_port(const char *device_name, uint8_t port,
                        ft_verbs_port_info *out, int *err_out);

#ifdef __cplusplus
}
#endif
#endif
