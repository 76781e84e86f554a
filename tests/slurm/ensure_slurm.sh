#!/usr/bin/env bash
# Make sure Debian's SLURM (slurm-wlm: slurmctld, slurmd, client tools) and munge are installed,
# for the tests marked `slurm` (tests/test_slurm.py starts the daemons itself, for localhost).
# Idempotent: returns at once when the programs are there; otherwise one apt-get update and a
# non-interactive install without recommends (about a minute). Needs root (CI runs as root).
set -euo pipefail
export PATH="$PATH:/usr/sbin:/sbin"  # slurmctld, slurmd and munged live in sbin
need=()
for prog in sbatch srun scontrol scancel slurmctld slurmd; do
  command -v "$prog" >/dev/null 2>&1 || { need+=(slurm-wlm); break; }
done
command -v munged >/dev/null 2>&1 || need+=(munge)
[[ ${#need[@]} -eq 0 ]] && exit 0
if [[ $(id -u) -ne 0 ]]; then
  echo "ensure_slurm: ${need[*]} missing and not root: install them (apt-get install slurm-wlm munge)" >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive
echo "ensure_slurm: installing ${need[*]}" >&2
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
