// The parts of the C interface that are plain C: status names and the
// per-thread message of the last failure (set by the Swift implementation).
#include "ft_worker.h"
#include "ft_worker_internal.h"

#include <string.h>

static _Thread_local char last_error[2048];

const char *ft_status_name(int status) {
    switch (status) {
    case FT_OK: return "FT_OK";
    case FT_E_INVALID_ARGUMENT: return "FT_E_INVALID_ARGUMENT";
    case FT_E_MISUSE: return "FT_E_MISUSE";
    case FT_E_NO_ENVIRONMENT: return "FT_E_NO_ENVIRONMENT";
    case FT_E_REFUSED: return "FT_E_REFUSED";
    case FT_E_CORRUPT: return "FT_E_CORRUPT";
    case FT_E_TIMEOUT: return "FT_E_TIMEOUT";
    case FT_E_TRANSPORT: return "FT_E_TRANSPORT";
    case FT_E_INTERRUPTED: return "FT_E_INTERRUPTED";
    case FT_E_INTERNAL: return "FT_E_INTERNAL";
    default: return "FT_E_UNKNOWN";
    }
}

const char *ft_last_error(void) { return last_error; }

void ft__set_last_error(const char *message) {
    if (message == NULL) {
        last_error[0] = 0;
        return;
    }
    // Truncated on a UTF-8 boundary so the message stays valid text.
    size_t n = strlen(message);
    if (n >= sizeof last_error) {
        n = sizeof last_error - 1;
        while (n > 0 && ((unsigned char)message[n] & 0xC0) == 0x80) n--;
    }
    memcpy(last_error, message, n);
    last_error[n] = 0;
}
