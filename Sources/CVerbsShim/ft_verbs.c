#include "ft_verbs.h"

#include <errno.h>
#include <string.h>
#include <infiniband/verbs.h>
#include <endian.h>

int ft_verbs_list_devices(ft_verbs_device_info *out, int capacity, int *err_out) {
    int num = 0;
    errno = 0;
    struct ibv_device **list = ibv_get_device_list(&num);
    if (list == NULL) {
        *err_out = errno != 0 ? errno : ENODEV;
        return -1;
    }
    for (int i = 0; i < num && i < capacity; i++) {
        ft_verbs_device_info *info = &out[i];
        memset(info, 0, sizeof(*info));
        const char *name = ibv_get_device_name(list[i]);
        if (name != NULL) {
            strncpy(info->name, name, sizeof(info->name) - 1);
        }
        info->guid = be64toh(ibv_get_device_guid(list[i]));
        info->node_type = (int)list[i]->node_type;
        info->transport_type = (int)list[i]->transport_type;
        struct ibv_context *ctx = ibv_open_device(list[i]);
        if (ctx == NULL) {
            info->open_errno = errno != 0 ? errno : EIO;
            continue;
        }
        struct ibv_device_attr attr;
        int rc = ibv_query_device(ctx, &attr);
        if (rc == 0) {
            info->phys_port_cnt = attr.phys_port_cnt;
        } else {
            info->open_errno = rc;
        }
        ibv_close_device(ctx);
    }
    ibv_free_device_list(list);
    *err_out = 0;
    return num;
}

int ft_verbs_query_port(const char *device_name, uint8_t port,
                        ft_verbs_port_info *out, int *err_out) {
    int num = 0;
    errno = 0;
    struct ibv_device **list = ibv_get_device_list(&num);
    if (list == NULL) {
        *err_out = errno != 0 ? errno : ENODEV;
        return -1;
    }
    int result = -1;
    *err_out = ENODEV;
    for (int i = 0; i < num; i++) {
        const char *name = ibv_get_device_name(list[i]);
        if (name == NULL || strcmp(name, device_name) != 0) continue;
        struct ibv_context *ctx = ibv_open_device(list[i]);
        if (ctx == NULL) {
            *err_out = errno != 0 ? errno : EIO;
            break;
        }
        struct ibv_port_attr attr;
        memset(&attr, 0, sizeof(attr));
        int rc = ibv_query_port(ctx, port, &attr);   // a macro in verbs.h
        if (rc == 0) {
            out->state = (int)attr.state;
            out->active_mtu = (int)attr.active_mtu;
            out->link_layer = (int)attr.link_layer;
            out->lid = attr.lid;
            *err_out = 0;
            result = 0;
        } else {
            *err_out = rc;
        }
        ibv_close_device(ctx);
        break;
    }
    ibv_free_device_list(list);
    return result;
}
