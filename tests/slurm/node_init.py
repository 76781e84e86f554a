"""Become a test cluster node, then run a command: ``node_init.py HOSTNAME HOSTS_FILE CMD ...``.

Run as ``nsenter --net=/run/netns/NS unshare --uts --mount -- python node_init.py ...`` (see netns.py): the
process is already in the node's network namespace and in fresh UTS and mount namespaces; this
sets the node's hostname, puts the cluster's hosts file over /etc/hosts (for this mount
namespace only: the machine's own /etc/hosts is untouched) and execs CMD (slurmd), whose jobs
inherit all three namespaces.
"""
import os
import socket
import subprocess
import sys


def main() -> None:
    if len(sys.argv) < 4:
        sys.exit("usage: node_init.py HOSTNAME HOSTS_FILE CMD [ARGS ...]")
    hostname, hosts, cmd = sys.argv[1], sys.argv[2], sys.argv[3:]
    socket.sethostname(hostname)
    subprocess.run(["mount", "--bind", hosts, "/etc/hosts"], check=True)
    os.execvp(cmd[0], cmd)


if __name__ == "__main__":
    main()
