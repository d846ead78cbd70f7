#!/usr/bin/env bash
# Bring up a REAL single-node SLURM cluster on localhost (Debian 12, SLURM 22.05) so
# the test suite can submit jobs with sbatch (through submitit) and read their states
# with sacct. CI calls it on a fresh machine before the tests; run it as root.
#
#   scripts/slurm_localhost.sh         install if needed, start munged, MariaDB,
#                                      slurmdbd, slurmctld and slurmd, then run a smoke job
#   scripts/slurm_localhost.sh stop    stop all of those daemons
#
# Idempotent: every step checks first and only does what is missing, so a second run
# on a live cluster only runs the smoke job. There is no systemd here, so the script
# starts every daemon itself. Anything that does not come up makes it exit nonzero
# with a message and the tail of the relevant log: it never silently skips.
set -Eeuo pipefail # -E: functions and subshells inherit the ERR trap below

readonly CLUSTER=localhost NODE=localhost
readonly PKGS=(slurmctld slurmd slurm-client slurmdbd munge mariadb-server)
readonly RUN=/run/slurm LOGDIR=/var/log/slurm STATEDIR=/var/lib/slurm
readonly SLURM_CONF=/etc/slurm/slurm.conf DBD_CONF=/etc/slurm/slurmdbd.conf
readonly MUNGE_KEY=/etc/munge/munge.key MUNGE_PID=/run/munge/munged.pid
readonly MYSQL_PID=/run/mysqld/mysqld.pid MYSQL_LOG=/var/log/mysql/error.log
# Seconds any one daemon, the node or the smoke job may take to come up.
readonly TIMEOUT=${SLURM_LOCALHOST_TIMEOUT:-60}

log() { echo "slurm_localhost: $*"; }

# die MSG [LOGFILE...]: explain, show the end of each log, exit 1.
die() {
  local msg=$1 f
  shift
  echo "slurm_localhost: ERROR: $msg" >&2
  for f in "$@"; do
    [[ -r $f ]] && { echo "----- tail of $f -----" >&2; tail -n 40 "$f" >&2; }
  done
  exit 1
}
trap 'die "unexpected failure at line $LINENO: $BASH_COMMAND"' ERR

# wait_until DESC CMD...: poll CMD twice a second until it succeeds or TIMEOUT passes.
wait_until() {
  local desc=$1 deadline=$((SECONDS + TIMEOUT))
  shift
  until "$@" >/dev/null 2>&1; do
    ((SECONDS < deadline)) || return 1
    sleep 0.5
  done
  log "$desc"
}

# pid_alive PIDFILE NAME: the pid in PIDFILE runs and is NAME (not a reused pid).
pid_alive() {
  local pid
  pid=$(cat "$1" 2>/dev/null) && [[ -n $pid && $(cat "/proc/$pid/comm" 2>/dev/null) == "$2" ]]
}

# ---------------------------------------------------------------- packages

installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q 'install ok installed'; }

install_packages() {
  local missing=() p
  for p in "${PKGS[@]}"; do installed "$p" || missing+=("$p"); done
  ((${#missing[@]})) || return 0
  log "installing ${missing[*]}"
  # We start the daemons ourselves, with our config: keep the packages' init scripts
  # from starting them during the install (Docker images usually ship this already).
  local policy=/usr/sbin/policy-rc.d own_policy=
  if [[ ! -e $policy ]]; then
    printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod 755 "$policy" && own_policy=1
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq || die "apt-get update failed"
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/tmp/slurm_localhost.apt.log 2>&1 ||
    die "apt-get install ${missing[*]} failed" /tmp/slurm_localhost.apt.log
  [[ -z $own_policy ]] || rm -f "$policy"
}

# --------------------------------------------------------------- config files

# install_file PATH MODE OWNER < CONTENT: write PATH only when its content changes,
# and set changed=1 then (so the caller restarts the daemon reading it), else 0.
changed=0
install_file() {
  local path=$1 mode=$2 owner=$3 tmp
  tmp=$(mktemp)
  cat >"$tmp"
  chmod "$mode" "$tmp"
  chown "$owner" "$tmp"
  if cmp -s "$tmp" "$path"; then
    rm -f "$tmp"
    chmod "$mode" "$path" && chown "$owner" "$path" # daemons check these too
    changed=0
    return 0
  fi
  mv -f "$tmp" "$path"
  changed=1
  log "wrote $path"
}

make_dirs() {
  mkdir -p "$RUN" "$LOGDIR" "$STATEDIR/slurmctld" "$STATEDIR/slurmd" /etc/slurm
  chown slurm:slurm "$RUN" "$LOGDIR" "$STATEDIR" "$STATEDIR/slurmctld"
  # slurmd and slurmstepd run as root; only slurmctld/slurmdbd run as SlurmUser=slurm.
  chown root:root "$STATEDIR/slurmd"
}

# RealMemory must not exceed what slurmd detects at registration, or slurmctld drains
# the node ("Low RealMemory"); 90% of the detected value leaves room for the small
# differences between hosts, kernels and what free memory the VM reports.
real_memory_mb() {
  local mb
  mb=$(slurmd -C | sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p')
  [[ $mb =~ ^[0-9]+$ ]] || die "could not read RealMemory from 'slurmd -C'"
  echo $((mb * 9 / 10))
}

# write_slurm_conf CPUS MEM_MB
write_slurm_conf() {
  local cpus=$1 mem=$2
  install_file "$SLURM_CONF" 0644 root:root <<EOF
# Written by scripts/slurm_localhost.sh: single-node test cluster, do not edit.
ClusterName=$CLUSTER
SlurmctldHost=localhost
SlurmUser=slurm
AuthType=auth/munge
# A requeued job may only start again after the credential lifetime (default 120 s);
# 20 s keeps 'scontrol requeue' tests quick and is still ample for launches on localhost.
AuthInfo=cred_expire=20
MpiDefault=none
# No mail on this machine; the default /bin/mail makes slurmctld log an error at start.
MailProg=/bin/true
ReturnToService=2
JobRequeue=1
StateSaveLocation=$STATEDIR/slurmctld
SlurmdSpoolDir=$STATEDIR/slurmd
SlurmctldPidFile=$RUN/slurmctld.pid
SlurmdPidFile=$RUN/slurmd.pid
SlurmctldLogFile=$LOGDIR/slurmctld.log
SlurmdLogFile=$LOGDIR/slurmd.log
# No usable cgroup hierarchy here: track job processes through /proc and bind no tasks.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
# Short kill grace and a small MinJobAge keep slurmctld's memory of finished jobs
# brief; sacct still has every job from slurmdbd.
KillWait=5
MinJobAge=120
SchedulerType=sched/backfill
# Allocate single CPUs (not whole cores, whatever the topology) so two 1-CPU jobs run
# side by side on 2 CPUs, and count memory so jobs may ask for --mem. Without
# DefMemPerCPU a job that names no --mem would take all the node's memory and so run alone.
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU_Memory
DefMemPerCPU=$((mem / cpus))
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
JobCompType=jobcomp/none
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF
}

# Reuse the password already in slurmdbd.conf so reruns do not churn the DB user.
db_password() {
  local pw=
  [[ -r $DBD_CONF ]] && pw=$(sed -n 's/^StoragePass=//p' "$DBD_CONF")
  [[ -n $pw ]] || pw=$(od -An -tx1 -N12 /dev/urandom | tr -d ' \n')
  echo "$pw"
}

# slurmdbd refuses a config that others can read (it holds the DB password).
write_dbd_conf() {
  install_file "$DBD_CONF" 0600 slurm:slurm <<EOF
# Written by scripts/slurm_localhost.sh, do not edit.
AuthType=auth/munge
DbdHost=localhost
SlurmUser=slurm
PidFile=$RUN/slurmdbd.pid
LogFile=$LOGDIR/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageLoc=slurm_acct_db
StorageUser=slurm
StoragePass=$1
EOF
}

# ------------------------------------------------------------------- daemons

munge_ok() { munge -n | unmunge; }

start_munge() {
  if [[ ! -s $MUNGE_KEY ]]; then
    log "creating $MUNGE_KEY"
    dd if=/dev/urandom of="$MUNGE_KEY" bs=1024 count=1 status=none
  fi
  chown munge:munge "$MUNGE_KEY" /etc/munge && chmod 0400 "$MUNGE_KEY" && chmod 0700 /etc/munge
  munge_ok >/dev/null 2>&1 && return 0
  mkdir -p /run/munge /var/log/munge /var/lib/munge
  chown munge:munge /run/munge /var/log/munge /var/lib/munge
  # munged refuses to run as root without --force; run it as its own user instead.
  runuser -u munge -- /usr/sbin/munged </dev/null 9>&- ||
    die "munged did not start" /var/log/munge/munged.log
  wait_until "munged up" munge_ok || die "munge -n | unmunge fails" /var/log/munge/munged.log
}

mysql_ok() { mariadb-admin ping; }

start_mariadb() {
  if ! mysql_ok >/dev/null 2>&1; then
    mkdir -p /run/mysqld /var/log/mysql
    chown mysql:mysql /run/mysqld /var/log/mysql
    [[ -d /var/lib/mysql/mysql ]] ||
      mariadb-install-db --user=mysql --datadir=/var/lib/mysql >/dev/null ||
      die "mariadb-install-db failed"
    # mariadbd does not daemonise: detach it ourselves. slurmdbd wants a lock wait
    # timeout of at least 900 s and logs an error otherwise.
    setsid /usr/sbin/mariadbd --user=mysql --pid-file="$MYSQL_PID" --log-error="$MYSQL_LOG" \
      --innodb-lock-wait-timeout=900 </dev/null >/dev/null 2>&1 9>&- &
    wait_until "MariaDB up" mysql_ok || die "MariaDB did not start" "$MYSQL_LOG"
  fi
  # Root logs in through the unix socket (Debian default), so no root password.
  mariadb <<EOF || die "could not create the slurm database and user"
CREATE DATABASE IF NOT EXISTS slurm_acct_db;
CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY '$1';
ALTER USER 'slurm'@'localhost' IDENTIFIED BY '$1';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';
EOF
}

dbd_ok() { timeout 10 sacctmgr -n -P list cluster format=cluster; }

# start_daemon NAME PIDFILE LOG CMD...: run CMD (which daemonises) unless NAME runs.
start_daemon() {
  local name=$1 pidfile=$2 logf=$3
  shift 3
  pid_alive "$pidfile" "$name" && return 0
  log "starting $name"
  "$@" </dev/null >>"$logf" 2>&1 9>&- || die "$name did not start" "$logf"
}

start_slurmdbd() {
  start_daemon slurmdbd "$RUN/slurmdbd.pid" "$LOGDIR/slurmdbd.log" /usr/sbin/slurmdbd
  wait_until "slurmdbd up" dbd_ok || die "slurmdbd does not answer sacctmgr" "$LOGDIR/slurmdbd.log"
  # Register the cluster before slurmctld starts, so its first connection to slurmdbd
  # finds it (and sacct has somewhere to look jobs up).
  if ! dbd_ok | grep -qx "$CLUSTER"; then
    sacctmgr -i add cluster "$CLUSTER" >/dev/null || die "sacctmgr add cluster failed" "$LOGDIR/slurmdbd.log"
    log "cluster $CLUSTER added to accounting"
  fi
}

ctld_ok() { scontrol ping | grep -q 'is UP'; }

start_slurmctld() {
  start_daemon slurmctld "$RUN/slurmctld.pid" "$LOGDIR/slurmctld.log" /usr/sbin/slurmctld
  wait_until "slurmctld up" ctld_ok || die "slurmctld does not answer scontrol ping" "$LOGDIR/slurmctld.log"
}

node_state() { sinfo -h -n "$NODE" -o %T; }
node_idle() { [[ $(node_state) =~ ^(idle|mixed|allocated)$ ]]; }

start_slurmd() {
  # -N: the node is called localhost whatever this machine's hostname is.
  start_daemon slurmd "$RUN/slurmd.pid" "$LOGDIR/slurmd.log" /usr/sbin/slurmd -N "$NODE"
  # A node drained by an earlier run (a killed slurmd, a failed job kill) stays drained
  # across restarts; ReturnToService only revives DOWN nodes. Resume it once.
  if [[ $(node_state) == drain* ]]; then
    log "node was $(node_state) ($(sinfo -h -n "$NODE" -o %E)); resuming it"
    scontrol update nodename="$NODE" state=resume
  fi
  wait_until "node $NODE up" node_idle ||
    die "node $NODE is '$(node_state)', not idle: $(sinfo -h -n "$NODE" -o %E)" \
      "$LOGDIR/slurmd.log" "$LOGDIR/slurmctld.log"
}

# stop_pid NAME PIDFILE: SIGTERM the daemon and wait for it to exit (SIGKILL after 30 s).
stop_pid() {
  local name=$1 pidfile=$2 pid i
  pid_alive "$pidfile" "$name" || return 0
  pid=$(cat "$pidfile")
  log "stopping $name (pid $pid)"
  kill "$pid"
  for ((i = 0; i < 150; i++)); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.2; done
  log "WARNING: $name ignored SIGTERM for 30 s; killing it"
  kill -9 "$pid" 2>/dev/null || true
}

stop_all() {
  stop_pid slurmd "$RUN/slurmd.pid"
  stop_pid slurmctld "$RUN/slurmctld.pid"
  stop_pid slurmdbd "$RUN/slurmdbd.pid"
  stop_pid mariadbd "$MYSQL_PID"
  stop_pid munged "$MUNGE_PID"
}

# ---------------------------------------------------------------- smoke test

# Submit a job that also launches a step (srun), as submitit's jobs do, and wait until
# sacct, i.e. slurmdbd, reports it COMPLETED.
smoke_test() {
  local out=/tmp/slurm_localhost.smoke.out id state deadline=$((SECONDS + TIMEOUT))
  rm -f "$out"
  id=$(sbatch --parsable -J smoke -o "$out" --wrap 'srun hostname') || die "sbatch failed"
  while :; do
    state=$(sacct -j "$id" -X -n -P -o State 2>/dev/null | head -n 1 || true)
    case $state in
      COMPLETED) break ;;
      "" | PENDING | RUNNING | COMPLETING | CONFIGURING | REQUEUED) ;;
      *) die "smoke job $id ended $state; output: $(cat "$out" 2>/dev/null || true)" "$LOGDIR/slurmd.log" ;;
    esac
    ((SECONDS < deadline)) || die "smoke job $id not COMPLETED in sacct after ${TIMEOUT}s (state '$state', squeue: $(squeue -h -j "$id" -o %T 2>&1 || true))" \
      "$LOGDIR/slurmctld.log" "$LOGDIR/slurmd.log" "$LOGDIR/slurmdbd.log"
    sleep 1
  done
  [[ -s $out ]] || die "smoke job $id COMPLETED but wrote nothing to $out"
  log "smoke job $id COMPLETED in sacct (ran on $(head -n 1 "$out"))"
}

# ----------------------------------------------------------------------- main

up() {
  local pw mem
  install_packages
  make_dirs
  mem=$(real_memory_mb)
  pw=$(db_password)
  # A changed config only takes effect after a restart of the daemons that read it.
  write_slurm_conf "$(nproc)" "$mem"
  if ((changed)); then
    stop_pid slurmd "$RUN/slurmd.pid"
    stop_pid slurmctld "$RUN/slurmctld.pid"
  fi
  write_dbd_conf "$pw"
  if ((changed)); then stop_pid slurmdbd "$RUN/slurmdbd.pid"; fi
  start_munge
  start_mariadb "$pw"
  start_slurmdbd
  start_slurmctld
  start_slurmd
  smoke_test
  log "SLURM up in $SECONDS s"
}

main() {
  [[ $(id -u) == 0 ]] || die "run as root (it installs packages and starts daemons)"
  # One run at a time: two concurrent CI steps must not start daemons twice. Every
  # daemon is started with fd 9 closed, or it would hold this lock for ever.
  exec 9>/run/slurm_localhost.lock
  flock -w 600 9 || die "another slurm_localhost.sh run holds /run/slurm_localhost.lock"
  case ${1:-up} in
    up) up ;;
    stop) stop_all; log "all daemons stopped" ;;
    *) die "usage: $0 [up|stop]" ;;
  esac
}

main "$@"
