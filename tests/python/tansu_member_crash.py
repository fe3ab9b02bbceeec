"""Shows a Tansu 0.6.0 consumer-group bug with an independent client (confluent-kafka).

Two members share a 4-partition topic. Member `a` (a child process) is killed with SIGKILL, so
it never sends LeaveGroup. After its session times out the broker rebalances, but the
surviving member `b` is handed back only its own partitions: `a`'s partitions stay assigned to
the dead member and are never consumed again. (A graceful close, with LeaveGroup, works.)

Usage: tansu_member_crash.py BROKERS            prints "final b assignment [..]"
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
    print("b assignment while a lives", assigned.get("b"), flush=True)
    a.send_signal(signal.SIGKILL)
    a.wait()
    deadline = time.time() + 25
    while time.time() < deadline:
        b.poll(0.2)
    print("final b assignment", assigned.get("b"), flush=True)
    b.close()


if __name__ == "__main__":
    main()
