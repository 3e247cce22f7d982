#!/usr/bin/env bash
# A one-node SLURM cluster on this machine (Debian's slurm-wlm 22.05 and munge), for the SLURM tests in
# tests/end_to_end/test_launchers.py: run as root; idempotent (a running cluster is left as it is).
# Installs the packages when missing (apt-get). Ends with `sinfo` showing the node idle, or exits 1 saying
# what failed. No cgroup.conf: 22.05 does not know CgroupPlugin=disabled and slurmd would not start.
set -euo pipefail
host=$(hostname -s)
log=/var/log/slurm
if ! command -v slurmd >/dev/null || ! command -v munged >/dev/null; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge >/dev/null
fi
mkdir -p /etc/munge /run/munge /var/lib/munge /var/log/munge /var/spool/slurmd /var/spool/slurmctld "$log"
[ -s /etc/munge/munge.key ] || mungekey -c
chown -R munge:munge /etc/munge /run/munge /var/lib/munge /var/log/munge
chmod 0700 /etc/munge && chmod 0400 /etc/munge/munge.key
pgrep -x munged >/dev/null || runuser -u munge -- munged
cat > /etc/slurm/slurm.conf.new <<EOF
ClusterName=local
SlurmctldHost=$host
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmUser=root
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldLogFile=$log/slurmctld.log
SlurmdLogFile=$log/slurmd.log
ReturnToService=2
NodeName=$host CPUs=$(nproc) RealMemory=20000 State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
if ! cmp -s /etc/slurm/slurm.conf.new /etc/slurm/slurm.conf; then  # a new config: restart the daemons
  mv /etc/slurm/slurm.conf.new /etc/slurm/slurm.conf
  scontrol shutdown 2>/dev/null && sleep 2 || true  # the running daemons (slurmctld and slurmd), if any
else
  rm /etc/slurm/slurm.conf.new
fi
pgrep -x slurmctld >/dev/null || slurmctld
pgrep -x slurmd >/dev/null || slurmd
for _ in $(seq 30); do
  state=$(sinfo -h -n "$host" -o %T 2>/dev/null || true)
  [ "$state" = idle ] && { sinfo; exit 0; }
  [ "$state" = down ] || [ "$state" = "down*" ] && scontrol update nodename="$host" state=resume || true
  sleep 1
done
echo "slurm_cluster.sh: node $host is '${state:-unknown}', not idle; see $log/slurmctld.log and slurmd.log" >&2
exit 1
