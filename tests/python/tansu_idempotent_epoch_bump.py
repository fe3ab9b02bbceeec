"""Tansu 0.6 (sqlite) wedges after an idempotent producer's epoch bump.

An idempotent producer whose record timed out while the broker was down bumps its epoch
(KIP-360) when the broker returns. Tansu's sqlite engine panics on that request ("more or less
than one row", tansu-storage lite.rs:503); the panic poisons its storage lock, after which every
producer, new or old, idempotent or not, fails. Prints "wedged" when that happens, "healthy"
when every attempt recovered. Usage: tansu_idempotent_epoch_bump.py TANSU_BIN WORKDIR PORT
"""
import os
import subprocess
import sys
import time

from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient, NewTopic

TANSU, WORKDIR, PORT = sys.argv[1], sys.argv[2], int(sys.argv[3])
BOOTSTRAP = f"127.0.0.1:{PORT}"


def start(run):
    log = open(os.path.join(WORKDIR, f"tansu-{run}-{time.time()}.log"), "w")
    broker = subprocess.Popen(
        [TANSU, "broker", "--listener-url", f"tcp://{BOOTSTRAP}", "--advertised-listener-url", f"tcp://{BOOTSTRAP}",
         "--storage-engine", "sqlite://tansu.db"],
        cwd=WORKDIR, stdout=subprocess.DEVNULL, stderr=log)
    time.sleep(1.5)
    return broker


def delivered(producer, key, seconds):
    deadline = time.time() + seconds
    while time.time() < deadline:
        result = []
        producer.produce("t", key=key, value=b"x", on_delivery=lambda err, msg: result.append(err))
        producer.flush(4)
        if result and result[0] is None:
            return True
    return False


# One directory and one port for every run (the bug showed that way; fresh data each run).
for run in range(16):
    for name in os.listdir(WORKDIR):
        if name.startswith("tansu.db"):
            os.remove(os.path.join(WORKDIR, name))
    broker = start(run)
    try:
        admin = AdminClient({"bootstrap.servers": BOOTSTRAP})
        admin.create_topics([NewTopic("t", 3, 1)])["t"].result()
        config = {"bootstrap.servers": BOOTSTRAP, "enable.idempotence": True, "acks": "all", "message.timeout.ms": 3000}
        producer = Producer(config)
        for i in range(5):
            producer.produce("t", key=str(i), value=b"x")
        producer.flush(10)
        broker.kill()
        broker.wait()
        producer.produce("t", key="down", value=b"x")  # times out: a sequence gap on its partition
        producer.flush(6)
        broker = start(run)
        # With these keys the bug shows (other keys may land where there is no gap to repair).
        if not delivered(producer, "old", 4):
            plain = Producer({**config, "enable.idempotence": False})
            print(f"run {run}: idempotent producer failing after restart")
            print("wedged" if not delivered(plain, "fresh-plain", 10) else "only the old producer fails")
            sys.exit(0)
        print(f"run {run}: recovered")
    finally:
        broker.kill()
        broker.wait()
print("healthy")
