#ifndef FT_PLATFORM_H
#define FT_PLATFORM_H

// Linux calls that Swift cannot import directly: syscall() and prctl() are
// variadic, and the posix_spawn attribute dance is easier to get right in C.
// Every function returns -1 with the errno in *err (or errno) on failure.

#include <stddef.h>
#include <sys/types.h>

#ifdef __cplusplus
extern "C" {
#endif

/// A pidfd for `pid` (Linux 5.3+): readable once the process has exited.
int ft_pidfd_open(pid_t pid);

/// Faults in every page of [addr, addr+len) for writing, so later writes
/// never page-fault. MADV_POPULATE_WRITE where the kernel has it, a write per
/// page otherwise. Returns 0, or -1 with errno.
int ft_prefault(void *addr, size_t len);

/// Faults in the whole pages inside [addr, addr+len) for writing with
/// MADV_POPULATE_WRITE only: contents are never read or written, so other
/// threads may write the range meanwhile. Returns 0, or -1 with errno
/// (EINVAL where the kernel lacks it: nothing was done).
int ft_populate_write(void *addr, size_t len);

/// glibc malloc: serve blocks below `mmap_threshold` from the heap and trim
/// the heap only past `trim_threshold`, so large blocks freed and allocated
/// again (network buffers) are reused instead of faulted in anew. Returns 0,
/// or -1 when the C library refused.
int ft_keep_freed_blocks(int mmap_threshold, int trim_threshold);

/// The pid and uid of the process at the other end of a Unix-domain socket
/// (SO_PEERCRED: who connected it). Returns 0, or -1 with errno.
int ft_peer_credentials(int fd, int *pid, unsigned int *uid);

/// Blocks `signals` for this thread (call before starting threads) and
/// returns a signalfd that reads them. Returns -1 with errno.
int ft_signalfd(const int *signals, int count);

/// Reads one signal from a signalfd: the signal number, or -1 with errno.
int ft_signalfd_read(int fd);

/// posix_spawn of `path` with `argv` and `envp` (NULL-terminated), with an
/// empty signal mask and default dispositions, in a new process group when
/// `new_process_group` is set. When `output_path` is not NULL, stdout and
/// stderr are appended to that file (created 0600). Returns the pid, or -1
/// with errno in *err.
pid_t ft_spawn(const char *path, char *const argv[], char *const envp[],
               int new_process_group, const char *output_path, int *err);

/// Copies `n` bytes with non-temporal stores where the CPU has them (the
/// destination bypasses the cache: no read-for-ownership of its lines), as
/// glibc's memcpy does only for very large copies. Falls back to memcpy.
void ft_copy_nontemporal(void *dst, const void *src, size_t n);

/// The calling process receives `sig` when its parent dies (PR_SET_PDEATHSIG).
int ft_set_parent_death_signal(int sig);

/// The calling thread's kernel id (for per-thread scheduling).
int ft_gettid(void);

#ifdef __cplusplus
}
#endif
#endif
