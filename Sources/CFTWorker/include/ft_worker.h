/*
 * ft_worker.h: the C interface of ft's worker library (libFTWorkerC.so).
 *
 * A training process started by ft-smp uses it to put its state under the
 * SMP's protection: register named tensors once, snapshot after each
 * optimizer update (the copy runs on the library's thread), wait before the
 * next update only while the copy still needs the bytes, restore after a
 * failure, and follow the coordinator's instructions (pause, restore,
 * resume, stop) through a pollable file descriptor. See the README, "Use it
 * from C" and "Use it from PyTorch".
 *
 * Rules of the interface:
 *   - Handles are opaque; no structure layout is part of the interface.
 *   - Every function that can fail returns an ft status (0: FT_OK). On a
 *     failure, ft_last_error() gives a sentence naming what failed, valid on
 *     the calling thread until its next call into the library.
 *   - Memory passed in (names, shapes, tensor bytes) is the caller's; the
 *     library keeps the tensor pointers given to ft_registration_add, which
 *     must stay valid while the client is open.
 *   - The version changes when a function changes meaning; functions and
 *     codes are only ever added within a version.
 */
#ifndef FT_WORKER_H
#define FT_WORKER_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define FT_ABI_VERSION 1

/* The interface version the loaded library implements (FT_ABI_VERSION). */
int ft_abi_version(void);

/* ---- status codes (stable) ---------------------------------------------- */
#define FT_OK 0
#define FT_E_INVALID_ARGUMENT 1 /* a null pointer, unknown dtype or role, bad shape, name */
#define FT_E_MISUSE 2           /* out of order: snapshot before register, register twice... */
#define FT_E_NO_ENVIRONMENT 3   /* not started by ft-smp: the FT_* environment is missing */
#define FT_E_REFUSED 4          /* the SMP or coordinator refused the request */
#define FT_E_CORRUPT 5          /* stored bytes fail their CRC32C */
#define FT_E_TIMEOUT 6          /* no answer in time */
#define FT_E_TRANSPORT 7        /* a socket or shared-memory failure */
#define FT_E_INTERRUPTED 8      /* given up: the coordinator moved on (a restore) */
#define FT_E_INTERNAL 9         /* a bug in the library */

/* "FT_OK", "FT_E_REFUSED", ...; "FT_E_UNKNOWN" for a code it does not know. */
const char *ft_status_name(int status);

/* The message of the last failed call on this thread ("" if none). */
const char *ft_last_error(void);

/* ---- tensors ------------------------------------------------------------ */
#define FT_DTYPE_F32 1
#define FT_DTYPE_F16 2
#define FT_DTYPE_BF16 3
#define FT_DTYPE_F64 4
#define FT_DTYPE_I32 5
#define FT_DTYPE_I64 6
#define FT_DTYPE_U8 7

#define FT_ROLE_PARAM 1
#define FT_ROLE_OPTIMIZER 2
#define FT_ROLE_RNG 3
#define FT_ROLE_META 4

/* Flags of a registered tensor. */
#define FT_TENSOR_REPLICATED 1u /* the same bytes on every DP rank: store only this rank's slice */
#define FT_TENSOR_EXTERNAL 2u   /* the caller copies it into the slot (device memory), see below */

/* ---- client: the snapshot path ------------------------------------------ */
typedef struct ft_client ft_client;
typedef struct ft_registration ft_registration;

/* Opens a client from the environment ft-smp gives its workers (FT_JOB_ID,
 * FT_WORKER_ID, FT_DP_RANK, FT_DP_SIZE, FT_SMP_ENDPOINT, FT_RESTART_COUNT).
 * FT_E_NO_ENVIRONMENT when they are missing: the process is unprotected. */
int ft_client_open(ft_client **out);
void ft_client_close(ft_client *client);

/* This worker's place: DP rank and size, and how often its SMP restarted it
 * (any pointer may be NULL). */
int ft_client_identity(const ft_client *client, int64_t *dp_rank, int64_t *dp_size, int64_t *restart_count);

/* A registration is built tensor by tensor, then given to the SMP in one
 * piece by ft_client_register: nothing is ever half-registered. */
int ft_registration_new(ft_registration **out);
void ft_registration_free(ft_registration *registration);
/* Adds a tensor: a unique name (1-255 bytes of UTF-8), its dtype, shape
 * (ndim <= 255 dimensions, each >= 0), role, flags, and its bytes (the full
 * tensor, contiguous; NULL only for an external or empty tensor). */
int ft_registration_add(ft_registration *registration, const char *name, int dtype, int ndim, const int64_t *shape,
                        int role, unsigned flags, void *data);
/* The number of tensors added so far. */
size_t ft_registration_count(const ft_registration *registration);

/* Registers with the SMP and maps the two snapshot slots. *committed_step:
 * the step the SMP holds committed for this worker (after a restart), -1
 * when none. The registration may be freed afterwards. */
int ft_client_register(ft_client *client, const ft_registration *registration, int64_t *committed_step);

/* Starts the snapshot of `step` (after the optimizer update of that step)
 * and returns at once; the copy runs on the library's thread. Blocks only if
 * the previous round is still finishing. Steps must increase. */
int ft_client_snapshot(ft_client *client, int64_t step);
/* Blocks while the round in flight still needs bytes the next optimizer
 * update will overwrite. Call it before every update. Reports a failure of
 * the round. */
int ft_client_wait_before_update(ft_client *client);
/* The same for the first `count` tensors (registration order) only: e.g.
 * buffers a forward pass updates, registered before the parameters. */
int ft_client_wait_copied(ft_client *client, size_t count);
/* Blocks until the round in flight is over (staged or skipped). */
int ft_client_wait_for_round(ft_client *client);
/* *can = 1 when a snapshot can start now for a worker whose last snapshot
 * or restore was `previous_step` (-1: none): no copy in flight here, and
 * that step committed on this node or no round pending there. A training
 * loop that snapshots only then has at most one round in flight, and needs
 * no barrier with its node's other ranks (their round of the same step does
 * not hold it back). */
int ft_client_can_snapshot(ft_client *client, int64_t previous_step, int *can);
/* Restores every tensor from the SMP's committed snapshot (DP slices of
 * replicated tensors from the SMP too), checking every chunk's CRC.
 * *step: the step restored, -1 when nothing is committed (a fresh start). */
int ft_client_restore(ft_client *client, int64_t *step);
/* Restores exactly `step` (the coordinator's choice): every tensor from
 * this node's SMP, and the slices of replicated tensors that DP rank r holds
 * from sources[r] (an SMP's data endpoint; "" or count 0: this node's SMP).
 * FT_E_REFUSED when the node cannot give back that step. */
int ft_client_restore_from(ft_client *client, int64_t step, const char *const *sources, size_t count);
/* Counters: snapshots staged and skipped, seconds the caller's thread was
 * blocked in snapshot and wait_before_update, seconds the last copy took
 * (begin to staged), last committed step (-1: none). Any pointer may be NULL. */
int ft_client_stats(const ft_client *client, int64_t *staged, int64_t *skipped, double *blocked_seconds,
                    double *last_round_seconds, int64_t *last_committed);

/* ---- external tensors (device memory) ------------------------------------
 * For a tensor registered with FT_TENSOR_EXTERNAL the caller copies its
 * stored bytes into the slot itself (e.g. an asynchronous device-to-host
 * copy into the pinned slot) and says when they landed; the library then
 * computes their CRCs and reports the snapshot staged. */

/* Slot `index` (0 or 1) as mapped in this process: pin it once for DMA. */
int ft_client_slot(const ft_client *client, int index, void **base, size_t *bytes);
/* Where tensor `index` (registration order) goes in a slot, and which bytes
 * of the tensor are stored (a replicated tensor stores its DP slice). */
int ft_client_placement(const ft_client *client, size_t index, size_t *slot_offset, size_t *source_offset,
                        size_t *stored_bytes);
/* Blocks until the round in flight knows its slot: *slot is 0 or 1, or -1
 * when there is no round in flight or the SMP skipped it (copy nothing). */
int ft_client_round_slot(ft_client *client, int *slot);
/* The caller's copies of the external tensors of the round in flight have
 * landed (ok = 1) or failed (ok = 0: the round fails). */
int ft_client_external_landed(ft_client *client, int ok);
/* Where the next restore writes external tensor `index` (host memory of
 * its full size; NULL: none). */
int ft_client_set_restore_buffer(ft_client *client, size_t index, void *host, size_t bytes);

/* ---- control: the coordinator's instructions -----------------------------
 * A worker under a coordinator says hello and heartbeats on the library's
 * thread, whatever the caller does. What the coordinator wants arrives as
 * events: the descriptor is readable while one is waiting.
 *
 *   restore  restore step ft_event_step (-1: start fresh) with ft_client_restore_from
 *            and the event's sources, then ft_control_ready
 *   resume   every rank is ready: train from step ft_event_step, ft_control_running
 *   pause    a failure somewhere: stop what you do (a silent coordinator is a hold,
 *            see ft_control_state); a restore follows (ft_event_epoch: its epoch)
 *   stop     the job is over (ft_event_failed: because it failed); exit
 *   fenced   this process was replaced; exit at once without touching anything
 */
typedef struct ft_control ft_control;
typedef struct ft_event ft_event;

#define FT_EVENT_RESTORE 1
#define FT_EVENT_RESUME 2
#define FT_EVENT_PAUSE 3
#define FT_EVENT_STOP 4
#define FT_EVENT_FENCED 5

/* Connects to the coordinator named by the environment ft-smp gives its
 * workers (FT_COORDINATOR_ENDPOINT, FT_KEYS_DIR, FT_NODE_ID and the
 * client's variables). FT_E_NO_ENVIRONMENT without a coordinator. */
int ft_control_open(ft_control **out);
void ft_control_close(ft_control *control);
/* Readable while an event is waiting (poll/select it; -1 for a NULL handle). */
int ft_control_fd(const ft_control *control);
/* The next event (never blocks); *out = NULL when none. Free it with ft_event_free. */
int ft_control_next(ft_control *control, ft_event **out);
/* Paused now (a pause not yet followed by running); held (the coordinator is
 * silent: stop at the next step boundary, abandon nothing, carry on when it
 * is back); and the epoch last heard. Any pointer may be NULL. */
int ft_control_state(const ft_control *control, int *paused, int *held, uint64_t *epoch);
/* What the training thread does now, for the coordinator's step-progress
 * watchdog (sent with every heartbeat). `waiting_on`: the rank a collective
 * waits for, -1 if unknown. */
#define FT_ACTIVITY_IDLE 0
#define FT_ACTIVITY_COMPUTING 1
#define FT_ACTIVITY_COLLECTIVE 2
#define FT_ACTIVITY_SNAPSHOT_WAIT 3
#define FT_ACTIVITY_RESTORING 4
#define FT_ACTIVITY_HELD 5
int ft_control_set_activity(ft_control *control, int activity, int64_t waiting_on);
/* Restored `restored_step` (-1: started fresh) and ready to resume. */
int ft_control_ready(ft_control *control, int64_t restored_step);
/* The ordered restore failed (after retries; `reason` says why): the
 * coordinator orders it again (another restore event) rather than taking
 * this worker for a hung one. */
int ft_control_restore_failed(ft_control *control, const char *reason);
/* Training again after a resume (clears the pause). */
int ft_control_running(ft_control *control);
/* The last step completed and the snapshots skipped, for the heartbeats. */
int ft_control_report(ft_control *control, int64_t step, int64_t skipped);
/* Snapshots staged so far and the training seconds they blocked, in all (for
   the coordinator's metrics: ft_snapshot_blocked_seconds). */
int ft_control_report_snapshots(ft_control *control, int64_t staged, double blocked_seconds);
/* Completed the last step; then wait for the stop event. */
int ft_control_done(ft_control *control, int64_t final_step);

int ft_event_kind(const ft_event *event);
uint64_t ft_event_epoch(const ft_event *event);
/* restore: the step to restore (-1: fresh); resume: the first step to train; else -1. */
int64_t ft_event_step(const ft_event *event);
/* stop: 1 when the job stopped because it failed. */
int ft_event_failed(const ft_event *event);
/* stop, fenced: why ("" otherwise); valid until ft_event_free. */
const char *ft_event_reason(const ft_event *event);
/* restore: the data endpoint of the SMP holding DP rank i's slices (for
 * ft_client_restore_from); valid until ft_event_free. */
size_t ft_event_source_count(const ft_event *event);
const char *ft_event_source(const ft_event *event, size_t index);
void ft_event_free(ft_event *event);

#ifdef __cplusplus
}
#endif
#endif /* FT_WORKER_H */
