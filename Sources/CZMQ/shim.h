#ifndef FT_CZMQ_SHIM_H
#define FT_CZMQ_SHIM_H
#include <zmq.h>
#include <errno.h>

// errno is a macro over a thread-local; read it through a function.
static inline int ft_zmq_errno(void) { return zmq_errno(); }
#endif
