#!/bin/sh
# Slurm Epilog for protected jobs: frees, on this host, the shared memory of
# the job's SMPs that could not free it themselves (SIGKILLed, or on a host
# that lost its SMP). Slurm runs it as root on every host of a job when the
# job ends. Set in slurm.conf:  Epilog=/path/to/cluster/slurm/epilog.sh
# It removes only /dev/shm/ft-slurm<SLURM_JOB_ID>-*: the segments of the job
# launched with the default job id (slurm<SLURM_JOB_ID>).
[ -n "${SLURM_JOB_ID:-}" ] || exit 0
for f in /dev/shm/ft-slurm"${SLURM_JOB_ID}"-*; do
    [ -e "$f" ] && rm -f -- "$f"
done
exit 0
