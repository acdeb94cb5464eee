# vmm's gdb commands.  Load them with `source PATH/vmm.gdb` (vmm run/replay --gdb
# print the path) or put that line in ~/.gdbinit.  Plain gdb CLI: no Python needed.
#
#   vmm-icount          where the machine is: retired instructions (of the recording's total)
#   vmm-seek ICOUNT     go to exactly ICOUNT retired instructions (replay only) and show it
#   vmm-refresh         make gdb forget its cached registers, frames and memory, then show $pc
#   vmm-checkpoints     the replay's checkpoints (what makes going back cheap)
#   vmm-exits           VM exits by reason so far
#
# Symbols of the bundled guests: `symbol-file guests/build/demo.sym` (hello.sym,
# crash.sym, t_*.sym: written by guests/build.py next to each image), then
# `break task_a`, `x/4i $pc` show the guest's labels.
#
# Why vmm-refresh: `monitor seek N` moves the machine, but gdb does not know a
# monitor command changed anything and keeps showing the registers it cached
# before.  vmm-seek does the seek and the refresh together, and the
# hookpost-monitor below refreshes after every `monitor` command.

define vmm-refresh
  maintenance flush register-cache
  maintenance flush dcache
  x/i $pc
end
document vmm-refresh
Forget gdb's cached registers, frames and memory (after `monitor seek`), then show the instruction at $pc.
end

define vmm-seek
  if $argc != 1
    echo usage: vmm-seek ICOUNT\n
  else
    monitor seek $arg0
    vmm-refresh
  end
end
document vmm-seek
Usage: vmm-seek ICOUNT
Replay to exactly ICOUNT retired instructions (forward or back, through checkpoints), then refresh gdb's view.
end

define vmm-icount
  monitor icount
end
document vmm-icount
Show the machine's position: retired instructions (and the recording's total when replaying).
end

define vmm-checkpoints
  monitor checkpoints
end
document vmm-checkpoints
List the replay's checkpoints.
end

define vmm-exits
  monitor info exits
end
document vmm-exits
VM exits by reason so far.
end

# After any `monitor` command (seek moves the machine), gdb re-reads registers and memory.
define hookpost-monitor
  maintenance flush register-cache
  maintenance flush dcache
end
