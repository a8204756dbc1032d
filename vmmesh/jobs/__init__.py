"""Jobs: running people's commands in VMs that carry the software they need.

``vmmesh run`` and ``vmmesh-condor`` (``client``, on the caller's side) hold
one long ``job.open`` call on their node.  The node (``service``) places the
VMs through the same coordinator as ``vmmesh request``, answers ``ready`` and
holds them for as long as the call lasts.  The caller sends input files in
chunks (``job.put``), runs the command with its stdout and stderr streamed as
they grow (``job.exec``) and fetches the results (``job.get``); each goes to
the VM's host, which does the guest's part through the agent only
(``guestjob``).  When the call ends for any reason (done, Ctrl-C, the CLI
killed, its link lost) the node shuts the VMs down, unless the session asked
to keep them.  A bag of tasks (``bag``, pure) gives each VM its next task when
it finishes the last; ``condor`` reads HTCondor's argument syntax.

What can fail, and who is told: a task that exits non-zero runs once more; one
whose VM or host was lost runs again elsewhere.  Each host holds a lease per
job that the owner renews; if the owner crashes or loses its link, the host's
watchdog shuts the job's VMs down itself.  The client's exit status tells
vmmesh's own failures apart from the job's.  Files on the caller's side are
read and written by the caller; the node never opens a path a user gave.

May import: vmmesh.api, vmmesh.extension, vmmesh.hypervisor, vmmesh.net.
"""
