"""Shows a Tansu 0.6.0 consumer-group bug with an independent client (confluent-kafka).

Two members share a 4-partition topic. Member `a` (a child process) is killed with SIGKILL, so
it never sends LeaveGroup. After its session times out the broker rebalances, but the
surviving member `b` is handed back only its own partitions: `a`'s partitions stay assigned to
the dead member and are never consumed again. (A graceful close, with LeaveGroup, works.)

Timing-dependent on a loaded machine (a starved heartbeat can get `a` expelled before the kill,
and then the survivor does get everything): the script tries up to three times and prints
"stranded" once the bug showed.

Usage: tansu_member_crash.py BROKERS     prints each try's assignments, then "stranded" if shown
"""

import signal
import subprocess
import sys
import time
import uuid

from confluent_kafka import Consumer
from confluent_kafka.admin import AdminClient, NewTopic

CONF = {"auto.offset.reset": "earliest", "session.timeout.ms": 6000, "heartbeat.interval.ms": 1000}


def member(brokers, topic, group):
    c = Consumer({"bootstrap.servers": brokers, "group.id": group, **CONF})
    c.subscribe([topic])
    while True:
        c.poll(0.1)


def main():
    brokers = sys.argv[1]
    if len(sys.argv) > 3:
        member(brokers, sys.argv[2], sys.argv[3])
        return
    for attempt in range(1, 4):
        before, after = one_try(brokers)
        print(f"try {attempt}: b assignment while a lives {before}, final b assignment {after}", flush=True)
        if before not in (None, [0, 1, 2, 3]) and after == before:
            print("stranded", flush=True)
            return


def one_try(brokers):
    topic, group = f"crash-{uuid.uuid4().hex[:8]}", f"g-{uuid.uuid4().hex[:8]}"
    admin = AdminClient({"bootstrap.servers": brokers})
    admin.create_topics([NewTopic(topic, 4, 1)])[topic].result()
    a = subprocess.Popen([sys.executable, __file__, brokers, topic, group])
    time.sleep(3)
    assigned = {}
    b = Consumer({"bootstrap.servers": brokers, "group.id": group, **CONF})
    b.subscribe([topic], on_assign=lambda c, parts: assigned.__setitem__("b", sorted(p.partition for p in parts)))
    deadline = time.time() + 12
    while time.time() < deadline:
        b.poll(0.1)
    before = assigned.get("b")
    a.send_signal(signal.SIGKILL)
    a.wait()
    deadline = time.time() + 25
    while time.time() < deadline:
        b.poll(0.2)
    after = assigned.get("b")
    b.close()
    return before, after


if __name__ == "__main__":
    main()
