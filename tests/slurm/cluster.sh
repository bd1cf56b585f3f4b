#!/usr/bin/env bash
# A one-node Slurm cluster on localhost for fgic's tests: `bash tests/slurm/cluster.sh start|stop|status`.
#
# Installs Debian's slurmctld, slurmd, slurm-client, slurmdbd, munge and mariadb-server when missing (needs root and
# apt), then starts munged, MariaDB, slurmdbd (real accounting: sacct, and so submitit, need it), slurmctld and
# slurmd without systemd. The node declares 8 CPUs and 2 GPUs whatever the machine has, so several small jobs fit
# and GPU-shaped job scripts run: the "GPUs" are character devices made with mknod, for which Slurm sets
# CUDA_VISIBLE_DEVICES but which nothing can compute on (fgic then trains on the CPU). Short scheduling,
# credential and KillWait intervals keep requeues at ~12 s instead of ~160 s. KillWait (15 s; Slurm's default 30) must
# hold a step finished after SIGTERM and its checkpoint write: on a loaded 2-core machine these took over 5 s.
# Everything the daemons write goes under $FGIC_SLURM_STATE (default /tmp/fgic-slurm); `stop` ends them.
set -euo pipefail

STATE="${FGIC_SLURM_STATE:-/tmp/fgic-slurm}"
HOST="$(hostname -s)"
CONF=/etc/slurm
DB_PASS=fgic-test-only

say() { echo "cluster.sh: $*" >&2; }

install_packages() {
    local missing=()
    for cmd in slurmctld slurmd sbatch munged slurmdbd mariadbd; do
        command -v "$cmd" >/dev/null || [ -x "/usr/sbin/$cmd" ] || missing+=("$cmd")
    done
    [ "${#missing[@]}" -eq 0 ] && return 0
    say "installing Slurm, munge and MariaDB (missing: ${missing[*]})"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q >/dev/null
    apt-get install -y -q --no-install-recommends slurmctld slurmd slurm-client slurmdbd munge mariadb-server >/dev/null
}

write_config() {
    mkdir -p "$STATE/ctld" "$STATE/spool" "$STATE/dev" "$CONF"
    for i in 0 1; do  # fake GPUs: character devices with the NVIDIA major number
        [ -c "$STATE/dev/gpu$i" ] || mknod "$STATE/dev/gpu$i" c 195 "$i"
    done
    cat >"$CONF/slurm.conf" <<EOF
# Written by fgic's tests/slurm/cluster.sh: a one-node test cluster.
ClusterName=fgic
SlurmctldHost=$HOST
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=cred_expire=10
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/spool
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/slurmctld.log
SlurmdLogFile=$STATE/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerParameters=sched_interval=2,bf_interval=2
KillWait=15
JobRequeue=1
ReturnToService=2
MpiDefault=none
SlurmdParameters=config_overrides
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
GresTypes=gpu
NodeName=$HOST CPUs=8 RealMemory=16000 Gres=gpu:2 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
    cat >"$CONF/gres.conf" <<EOF
NodeName=$HOST Name=gpu File=$STATE/dev/gpu[0-1]
EOF
    cat >"$CONF/slurmdbd.conf" <<EOF
AuthType=auth/munge
DbdHost=localhost
SlurmUser=root
PidFile=$STATE/slurmdbd.pid
LogFile=$STATE/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=slurm
StoragePass=$DB_PASS
StorageLoc=slurm_acct_db
EOF
    chmod 600 "$CONF/slurmdbd.conf"
}

wait_for() {  # wait_for SECONDS WHAT COMMAND...
    local limit=$1 what=$2
    shift 2
    for _ in $(seq "$((limit * 4))"); do
        "$@" >/dev/null 2>&1 && return 0
        sleep 0.25
    done
    say "error: $what did not come up in ${limit} s; see the logs in $STATE"
    return 1
}

start() {
    if status >/dev/null 2>&1; then say "already up"; return 0; fi
    install_packages
    write_config
    if ! pgrep -x munged >/dev/null; then
        mkdir -p /run/munge && chown munge:munge /run/munge
        runuser -u munge -- /usr/sbin/munged
    fi
    wait_for 10 munged munge -n
    if ! pgrep -x mariadbd >/dev/null; then
        mkdir -p /run/mysqld && chown mysql:mysql /run/mysqld
        (setsid /usr/sbin/mariadbd --user=mysql >"$STATE/mariadb.log" 2>&1 &)
    fi
    wait_for 30 MariaDB mariadb -e "select 1"
    if ! pgrep -x slurmdbd >/dev/null; then
        # A fresh accounting database: slurmctld -c starts job ids at 1 again, and sacct must not mix in old jobs.
        mariadb -e "DROP DATABASE IF EXISTS slurm_acct_db;
                    CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY '$DB_PASS';
                    GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';"
        /usr/sbin/slurmdbd
    fi
    wait_for 30 slurmdbd sacctmgr -n list cluster
    sacctmgr -i -Q add cluster fgic >/dev/null 2>&1 || true
    pgrep -x slurmctld >/dev/null || /usr/sbin/slurmctld -c
    pgrep -x slurmd >/dev/null || /usr/sbin/slurmd
    wait_for 30 "the node" node_idle
    say "up: node $HOST idle ($(sinfo -h -o '%c CPUs, %G'))"
}

node_idle() { sinfo -h -N -o %t | grep -qx idle; }

status() { node_idle && sacct -n -X -S now >/dev/null; }

stop() {
    local daemons=(slurmd slurmctld slurmdbd mariadbd) left
    for daemon in "${daemons[@]}"; do pkill -x "$daemon" || true; done
    for _ in $(seq 40); do
        left=0
        for daemon in "${daemons[@]}"; do pgrep -x "$daemon" >/dev/null && left=1; done
        [ "$left" -eq 0 ] && break
        sleep 0.25
    done
    say "stopped"
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    status) if status; then say "up"; else say "down"; exit 1; fi ;;
    *) echo "usage: bash tests/slurm/cluster.sh start|stop|status" >&2; exit 2 ;;
esac
