#!/usr/bin/env bash
# A real single-node Slurm cluster for the launcher's tests: slurmctld + slurmd, munge for auth, and
# slurmdbd on MariaDB so `sacct` answers (submitit needs it to learn a cancelled job's state).
#
#   slurm/cluster.sh start    install what is missing (Debian packages), write configs, start, wait idle
#   slurm/cluster.sh stop     stop the daemons THIS script started (by their pid files), nothing else
#   slurm/cluster.sh status   exit 0 when the cluster answers
#
# Everything lives under $PERSGUARD_SLURM_DIR (default /tmp/persguard-slurm); clients need
# `source $PERSGUARD_SLURM_DIR/env` (SLURM_CONF). Needs root (apt, daemons running as root).
set -euo pipefail

STATE="${PERSGUARD_SLURM_DIR:-/tmp/persguard-slurm}"
CLUSTER=persguard
PACKAGES=(slurmctld slurmd slurm-client munge slurmdbd mariadb-server)
DAEMONS=(slurmd slurmctld slurmdbd mariadbd munged)   # stop order

log() { echo "[cluster] $*" >&2; }

install_packages() {
    local missing=()
    for p in "${PACKAGES[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
    [ ${#missing[@]} -eq 0 ] && return
    log "installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -q --no-install-recommends "${missing[@]}" >"$STATE/apt.log" 2>&1 || {
        apt-get update -q >>"$STATE/apt.log" 2>&1
        apt-get install -y -q --no-install-recommends "${missing[@]}" >>"$STATE/apt.log" 2>&1
    }
    # the packages' own services must not hold the ports or the munge socket
    for s in slurmctld slurmd slurmdbd munge mariadb; do service "$s" stop >/dev/null 2>&1 || true; done
}

alive() { [ -f "$STATE/run/$1.pid" ] && kill -0 "$(cat "$STATE/run/$1.pid")" 2>/dev/null; }

wait_for() {   # wait_for SECONDS DESCRIPTION COMMAND...
    local limit=$1 what=$2; shift 2
    for _ in $(seq $((limit * 10))); do "$@" >/dev/null 2>&1 && return 0; sleep 0.1; done
    log "timed out waiting for $what (logs in $STATE/log)"; return 1
}

start_munge() {
    mkdir -p "$STATE/munge"
    [ -f "$STATE/munge/munge.key" ] || dd if=/dev/urandom of="$STATE/munge/munge.key" bs=1024 count=1 2>/dev/null
    chmod 711 "$STATE/munge"; chmod 400 "$STATE/munge/munge.key"
    munged --force --key-file="$STATE/munge/munge.key" --socket="$STATE/munge/munge.socket" \
        --pid-file="$STATE/run/munged.pid" --log-file="$STATE/log/munged.log" --seed-file="$STATE/munge/seed"
    wait_for 10 munged test -S "$STATE/munge/munge.socket"
}

start_mariadb() {
    if [ ! -d "$STATE/mysql/mysql" ]; then
        mariadb-install-db --user=root --datadir="$STATE/mysql" --auth-root-authentication-method=socket \
            >"$STATE/log/mariadb-install.log" 2>&1
    fi
    mariadbd --user=root --datadir="$STATE/mysql" --socket="$STATE/run/mysql.sock" --skip-networking=0 \
        --bind-address=127.0.0.1 --port=3307 --pid-file="$STATE/run/mariadbd.pid" \
        --log-error="$STATE/log/mariadb.log" >/dev/null 2>&1 &
    wait_for 30 mariadb mariadb --socket="$STATE/run/mysql.sock" -e "select 1"
    mariadb --socket="$STATE/run/mysql.sock" -e "
        CREATE DATABASE IF NOT EXISTS slurm_acct_db;
        CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY 'slurm';
        CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY 'slurm';
        GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';
        GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';"
}

write_configs() {
    local host cpus mem
    host=$(hostname -s)
    cpus=$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)   # nproc obeys OMP_NUM_THREADS: 1 would make a 1-CPU node
    mem=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 * 8 / 10 ))
    # slurmdbd reads slurmdbd.conf from the folder of SLURM_CONF
    cat >"$STATE/slurmdbd.conf" <<EOF
AuthType=auth/munge
AuthInfo=socket=$STATE/munge/munge.socket
DbdHost=localhost
DbdPort=6819
SlurmUser=root
PidFile=$STATE/run/slurmdbd.pid
LogFile=$STATE/log/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=3307
StorageUser=slurm
StoragePass=slurm
StorageLoc=slurm_acct_db
EOF
    chmod 600 "$STATE/slurmdbd.conf"
    # cred_expire=10: a requeued job may start again after 10 s instead of 120
    cat >"$STATE/slurm.conf" <<EOF
ClusterName=$CLUSTER
SlurmctldHost=$host
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$STATE/munge/munge.socket,cred_expire=10
SlurmctldPort=6817
SlurmdPort=6818
StateSaveLocation=$STATE/state
SlurmdSpoolDir=$STATE/spool
SlurmctldPidFile=$STATE/run/slurmctld.pid
SlurmdPidFile=$STATE/run/slurmd.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=6819
AccountingStoragePass=$STATE/munge/munge.socket
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
ReturnToService=2
JobRequeue=1
MinJobAge=30
SchedulerType=sched/backfill
NodeName=$host CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
    echo "export SLURM_CONF=$STATE/slurm.conf" >"$STATE/env"
}

cluster_answers() { SLURM_CONF="$STATE/slurm.conf" sinfo -h -o %T 2>/dev/null | grep -qE '^(idle|mixed|allocated)'; }

start() {
    mkdir -p "$STATE"/{run,log}
    if alive slurmctld && alive slurmd && cluster_answers; then
        log "already running"; cat "$STATE/env"; return
    fi
    stop >/dev/null 2>&1 || true
    local t0=$SECONDS
    install_packages
    log "packages ready ($((SECONDS - t0)) s)"
    t0=$SECONDS
    # Fresh queue AND fresh accounting together: job ids restart at 1, and an old accounting record of
    # the same id would hand submitit a stale state (measured: a new job 2 read as "CANCELLED by 0").
    rm -rf "$STATE/state" "$STATE/spool" "$STATE/mysql"
    mkdir -p "$STATE"/{state,spool}
    write_configs
    export SLURM_CONF="$STATE/slurm.conf"
    start_munge
    start_mariadb
    slurmdbd
    wait_for 30 slurmdbd sacctmgr -n list cluster
    sacctmgr -i add cluster "$CLUSTER" >/dev/null 2>&1 || true
    slurmctld
    slurmd
    wait_for 60 "the node to be idle" cluster_answers
    log "cluster up ($((SECONDS - t0)) s); clients: source $STATE/env"
    cat "$STATE/env"
}

stop() {
    for d in "${DAEMONS[@]}"; do
        alive "$d" || continue
        local pid; pid=$(cat "$STATE/run/$d.pid")
        kill "$pid" 2>/dev/null || true
        for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -9 "$pid" 2>/dev/null || true
        rm -f "$STATE/run/$d.pid"
        log "stopped $d ($pid)"
    done
}

status() {
    for d in "${DAEMONS[@]}"; do
        if alive "$d"; then echo "$d: running ($(cat "$STATE/run/$d.pid"))"; else echo "$d: stopped"; fi
    done
    cluster_answers && SLURM_CONF="$STATE/slurm.conf" sinfo
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    status) status ;;
    *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
