// Not part of the interface: helpers the Swift implementation calls.
#ifndef FT_WORKER_INTERNAL_H
#define FT_WORKER_INTERNAL_H

// Sets (NULL: clears) this thread's ft_last_error() message.
void ft__set_last_error(const char *message);

#endif
