"""Lockstep fault tolerance (DESIGN.md "Lockstep fault tolerance"): a primary
that runs a guest live and streams its event log to a backup, which replays
it a bounded lag behind and goes live where the primary died.

It lives under replay/ because it *is* record/replay with the log on a TCP
connection: the primary is ``replay.session.record`` writing to the link, the
backup a ``Replayer`` reading from it; nothing below replay/ knows about it.

Modules:
  wire     the link between the two: framed messages, heartbeats, failure detection
  arbiter  the atomic test-and-set that decides who may be live (no split brain): a lock
           file, or an arbiter process's lease (`vmm ft arbiter`, --arbiter tcp:HOST:PORT)
  console  the console endpoint: outputs carry their stream position, inputs theirs
  netgate  the output rule for the frames the primary's NICs send
  primary  ``run_primary``: record to the link, the output rule, --max-lag
  backup   ``run_backup``: replay from the link, take over at the last horizon

The protocol, in order of a run:
  1. the primary connects and sends HELLO (FT parameters), then the log header
     and the initial digests (LOG);
  2. the backup builds the machine from the header, checks the image hash and the
     initial state digest, and answers ACCEPT or REFUSE (one line); the primary
     runs no instruction before ACCEPT;
  3. every FLUSH_TICKS of virtual time the primary writes the events so far as a
     log chunk (LOG) and a HORIZON: "every event before this point of virtual
     time is in the log"; the backup ACKs each horizon once it holds the log up to
     it, and reports its replay position (in the ACK, and as PROGRESS when no ACK
     told it for 4 horizons);
  4. console output produced before an acknowledged horizon is released to the
     console's clients; output after it waits;
  5. both sides send BEATs when otherwise idle; silence for 3 heartbeat intervals,
     or the connection closing, is a failure;
  6. on a failure each side tries the arbiter: the backup that wins replays to the
     last horizon it holds and goes live there; the primary that wins goes on
     alone, releasing what it held; the loser stops (never two live sides).
  7. restoring redundancy: a primary that runs alone takes a backup that joins
     (`vmm ft backup --join`, on the console address: JOIN instead of HELLO).  At
     its next horizon it sends HELLO, JOIN (the join point), the machine's saved
     state as snapshot-file bytes (SNAP), the console output so far (OUTPUT),
     then a log that starts there (a new header naming that snapshot) and the
     horizon; the backup builds the machine from the snapshot, with the digest
     and horizon timers at their saved deadlines and order, and answers ACCEPT.
     The pair contends from then on for the arbiter's next lease (PATH.1, ...),
     which no backup of an earlier pairing can win.
"""
