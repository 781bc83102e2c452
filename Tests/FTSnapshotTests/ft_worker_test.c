// A C program that links libFTWorkerC.so through ft_worker.h alone: it
// registers, snapshots and restores against a real SMP (the Swift test
// FTWorkerCTests starts one and runs this program as DP ranks 0 and 1).
//
//   ft_worker_test snapshot STEPS   register, snapshot steps 1..STEPS (each
//                                   with the step's pattern), then exit
//   ft_worker_test restore STEPS    register, restore, check that every
//                                   tensor holds step STEPS's pattern
//   ft_worker_test misuse           bad arguments and calls out of order
//   ft_worker_test alone            no FT_* environment: FT_E_NO_ENVIRONMENT
//
// Exit status 0 when every check held; each failed check prints a line.
#define _POSIX_C_SOURCE 200809L
#include "ft_worker.h"

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define PARAMS (1000 * 300)  // replicated float32: 1.2 MB, two chunks
#define MOMENTS 4096         // replicated bfloat16 (as raw 16-bit words)
#define DEVICE 5000          // an external tensor: this program copies it into the slot itself

static int failures = 0;

#define CHECK(cond, ...)                                                      \
    do {                                                                      \
        if (!(cond)) {                                                        \
            fprintf(stderr, "check failed (%s:%d): ", __FILE__, __LINE__);    \
            fprintf(stderr, __VA_ARGS__);                                     \
            fprintf(stderr, "\n");                                            \
            failures++;                                                       \
        }                                                                     \
    } while (0)

// A call that must succeed; on failure: its status name and message, then exit.
#define MUST(call)                                                                                        \
    do {                                                                                                  \
        int rc_ = (call);                                                                                 \
        if (rc_ != FT_OK) {                                                                               \
            fprintf(stderr, "%s failed: %s: %s\n", #call, ft_status_name(rc_), ft_last_error());           \
            exit(2);                                                                                      \
        }                                                                                                 \
    } while (0)

static float params[PARAMS];
static uint16_t moments[MOMENTS];
static int64_t counter[1];
static uint8_t rng[64];
static int32_t device[DEVICE];  // stands for device memory the library cannot read

static void fill(int64_t step, int64_t rank) {
    for (int i = 0; i < PARAMS; i++) params[i] = (float)(step * 1000 + i);
    for (int i = 0; i < MOMENTS; i++) moments[i] = (uint16_t)(step * 7 + i);
    counter[0] = rank * 100 + step;
    for (int i = 0; i < 64; i++) rng[i] = (uint8_t)(rank * 31 + step + i);
    for (int i = 0; i < DEVICE; i++) device[i] = (int32_t)(step * 100000 + i);
}

static int verify(int64_t step, int64_t rank) {
    int bad = 0;
    for (int i = 0; i < PARAMS; i++) bad += params[i] != (float)(step * 1000 + i);
    for (int i = 0; i < MOMENTS; i++) bad += moments[i] != (uint16_t)(step * 7 + i);
    bad += counter[0] != rank * 100 + step;
    for (int i = 0; i < 64; i++) bad += rng[i] != (uint8_t)(rank * 31 + step + i);
    for (int i = 0; i < DEVICE; i++) bad += device[i] != (int32_t)(step * 100000 + i);
    return bad;
}

static ft_client *open_and_register(int64_t *committed, int64_t *rank) {
    ft_client *client = NULL;
    MUST(ft_client_open(&client));
    int64_t size = 0, restarts = 0;
    MUST(ft_client_identity(client, rank, &size, &restarts));
    ft_registration *reg = NULL;
    MUST(ft_registration_new(&reg));
    int64_t p_shape[2] = {1000, 300}, m_shape[1] = {MOMENTS}, c_shape[1] = {1}, r_shape[1] = {64}, d_shape[1] = {DEVICE};
    MUST(ft_registration_add(reg, "params", FT_DTYPE_F32, 2, p_shape, FT_ROLE_PARAM, FT_TENSOR_REPLICATED, params));
    MUST(ft_registration_add(reg, "adam.m", FT_DTYPE_BF16, 1, m_shape, FT_ROLE_OPTIMIZER, FT_TENSOR_REPLICATED, moments));
    MUST(ft_registration_add(reg, "step", FT_DTYPE_I64, 1, c_shape, FT_ROLE_META, 0, counter));
    MUST(ft_registration_add(reg, "rng", FT_DTYPE_U8, 1, r_shape, FT_ROLE_RNG, 0, rng));
    MUST(ft_registration_add(reg, "device", FT_DTYPE_I32, 1, d_shape, FT_ROLE_PARAM, FT_TENSOR_EXTERNAL, NULL));
    CHECK(ft_registration_count(reg) == 5, "registration holds %zu tensors", ft_registration_count(reg));
    MUST(ft_client_register(client, reg, committed));
    ft_registration_free(reg);
    return client;
}

// The external tensor's part of a round: copy it into the round's slot.
static void copy_external(ft_client *client) {
    int slot = -1;
    MUST(ft_client_round_slot(client, &slot));
    if (slot < 0) return;  // skipped: nothing to copy
    void *base = NULL;
    size_t bytes = 0, offset = 0, source = 0, stored = 0;
    MUST(ft_client_slot(client, slot, &base, &bytes));
    MUST(ft_client_placement(client, 4, &offset, &source, &stored));
    CHECK(offset + stored <= bytes && stored == sizeof device && source == 0, "placement %zu+%zu of %zu", offset, stored, bytes);
    memcpy((char *)base + offset, (char *)device + source, stored);
    MUST(ft_client_external_landed(client, 1));
}

// Waits until every rank of `size` registered (a file per rank in
// FT_TEST_BARRIER_DIR): a node commits a step once all its registered workers
// staged it, so no rank may snapshot before the others joined (a coordinator
// ensures it in a real job).
static void registered_barrier(int64_t rank, int64_t size) {
    const char *dir = getenv("FT_TEST_BARRIER_DIR");
    if (dir == NULL) return;
    char path[4096];
    snprintf(path, sizeof path, "%s/registered-%lld", dir, (long long)rank);
    FILE *f = fopen(path, "w");
    if (f) fclose(f);
    for (int64_t r = 0; r < size; r++) {
        snprintf(path, sizeof path, "%s/registered-%lld", dir, (long long)r);
        for (int i = 0; i < 60000; i++) {
            FILE *g = fopen(path, "r");
            if (g) {
                fclose(g);
                break;
            }
            nanosleep(&(struct timespec){0, 1000000}, NULL);
        }
    }
}

static int snapshot_steps(int64_t steps) {
    int64_t committed = 0, rank = 0, size = 0;
    ft_client *client = open_and_register(&committed, &rank);
    CHECK(committed == -1, "a fresh worker has committed step %lld", (long long)committed);
    MUST(ft_client_identity(client, NULL, &size, NULL));
    registered_barrier(rank, size);
    for (int64_t step = 1; step <= steps; step++) {
        MUST(ft_client_wait_before_update(client));
        fill(step, rank);
        // As a training loop does: snapshot only when no round is pending here.
        for (int can = 0; !can;) {
            MUST(ft_client_can_snapshot(client, step - 1 > 0 ? step - 1 : -1, &can));
            if (!can) nanosleep(&(struct timespec){0, 1000000}, NULL);
        }
        MUST(ft_client_snapshot(client, step));
        copy_external(client);
        MUST(ft_client_wait_for_round(client));
    }
    int64_t staged = 0;
    MUST(ft_client_stats(client, &staged, NULL, NULL, NULL, NULL));
    CHECK(staged == steps, "staged %lld snapshots of %lld", (long long)staged, (long long)steps);
    ft_client_close(client);
    return failures;
}

static int restore_step(int64_t steps) {
    int64_t committed = 0, rank = 0;
    memset(params, 0, sizeof params);
    memset(device, 0, sizeof device);
    ft_client *client = open_and_register(&committed, &rank);
    CHECK(committed == steps, "the SMP holds step %lld committed, expected %lld", (long long)committed, (long long)steps);
    CHECK(ft_client_restore(client, &(int64_t){0}) == FT_E_MISUSE, "a restore without a buffer for the external tensor");
    CHECK(strstr(ft_last_error(), "device") != NULL, "the message names the tensor: %s", ft_last_error());
    MUST(ft_client_set_restore_buffer(client, 4, device, sizeof device));
    int64_t step = -1;
    MUST(ft_client_restore(client, &step));
    CHECK(step == steps, "restored step %lld, expected %lld", (long long)step, (long long)steps);
    int bad = verify(steps, rank);
    CHECK(bad == 0, "%d values differ from step %lld's", bad, (long long)steps);
    ft_client_close(client);
    return failures;
}

static int misuse(void) {
    ft_client *client = NULL;
    MUST(ft_client_open(&client));
    CHECK(ft_client_snapshot(client, 1) == FT_E_MISUSE, "snapshot before register");
    CHECK(strstr(ft_last_error(), "register") != NULL, "message: %s", ft_last_error());
    CHECK(ft_client_snapshot(NULL, 1) == FT_E_INVALID_ARGUMENT, "NULL client");
    ft_registration *reg = NULL;
    MUST(ft_registration_new(&reg));
    int64_t shape[1] = {4}, negative[1] = {-4};
    float data[4] = {0};
    CHECK(ft_registration_add(reg, NULL, FT_DTYPE_F32, 1, shape, FT_ROLE_PARAM, 0, data) == FT_E_INVALID_ARGUMENT, "NULL name");
    CHECK(ft_registration_add(reg, "x", 99, 1, shape, FT_ROLE_PARAM, 0, data) == FT_E_INVALID_ARGUMENT, "unknown dtype");
    CHECK(strstr(ft_last_error(), "'x'") && strstr(ft_last_error(), "dtype"), "message: %s", ft_last_error());
    CHECK(ft_registration_add(reg, "x", FT_DTYPE_F32, 1, negative, FT_ROLE_PARAM, 0, data) == FT_E_INVALID_ARGUMENT, "negative dim");
    CHECK(ft_registration_add(reg, "x", FT_DTYPE_F32, 1, shape, 9, 0, data) == FT_E_INVALID_ARGUMENT, "unknown role");
    CHECK(ft_registration_add(reg, "x", FT_DTYPE_F32, 1, shape, FT_ROLE_PARAM, 0x80, data) == FT_E_INVALID_ARGUMENT, "unknown flag");
    CHECK(ft_registration_add(reg, "x", FT_DTYPE_F32, 1, shape, FT_ROLE_PARAM, 0, NULL) == FT_E_INVALID_ARGUMENT, "NULL data");
    CHECK(ft_registration_count(reg) == 0, "refused tensors were added");
    MUST(ft_registration_add(reg, "x", FT_DTYPE_F32, 1, shape, FT_ROLE_PARAM, 0, data));
    CHECK(ft_registration_add(reg, "x", FT_DTYPE_F32, 1, shape, FT_ROLE_PARAM, 0, data) == FT_E_INVALID_ARGUMENT, "duplicate name");
    int64_t committed = 0;
    MUST(ft_client_register(client, reg, &committed));
    CHECK(ft_client_register(client, reg, &committed) == FT_E_MISUSE, "register twice");
    CHECK(ft_client_snapshot(client, -1) == FT_E_INVALID_ARGUMENT, "negative step");
    MUST(ft_client_snapshot(client, 5));
    MUST(ft_client_wait_for_round(client));
    CHECK(ft_client_snapshot(client, 5) == FT_E_REFUSED || (ft_client_wait_for_round(client) == FT_E_REFUSED),
          "a step that does not increase");
    ft_registration_free(reg);
    ft_client_close(client);
    CHECK(strcmp(ft_status_name(FT_E_CORRUPT), "FT_E_CORRUPT") == 0, "status name");
    CHECK(strcmp(ft_status_name(12345), "FT_E_UNKNOWN") == 0, "unknown status name");
    return failures;
}

int main(int argc, char **argv) {
    if (ft_abi_version() != FT_ABI_VERSION) {
        fprintf(stderr, "library ABI %d, header %d\n", ft_abi_version(), FT_ABI_VERSION);
        return 2;
    }
    const char *mode = argc > 1 ? argv[1] : "";
    int64_t steps = argc > 2 ? atoll(argv[2]) : 3;
    if (strcmp(mode, "snapshot") == 0) return snapshot_steps(steps) ? 1 : 0;
    if (strcmp(mode, "restore") == 0) return restore_step(steps) ? 1 : 0;
    if (strcmp(mode, "misuse") == 0) return misuse() ? 1 : 0;
    if (strcmp(mode, "alone") == 0) {
        ft_client *client = NULL;
        int rc = ft_client_open(&client);
        CHECK(rc == FT_E_NO_ENVIRONMENT && client == NULL, "open without environment gave %s", ft_status_name(rc));
        CHECK(strstr(ft_last_error(), "FT_SMP_ENDPOINT") != NULL, "message: %s", ft_last_error());
        return failures ? 1 : 0;
    }
    fprintf(stderr, "usage: ft_worker_test snapshot|restore|misuse|alone [STEPS]\n");
    return 2;
}
