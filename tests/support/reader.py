# Reads files of a lazily mounted image in a loop and checks every byte, while the test restarts
# the daemon serving the mount. Run as: python3 reader.py ROOT CHECK_DIR
#
# CHECK_DIR/expected lists "SHA256 PATH" (paths relative to ROOT); its first line is the large
# file, read sequentially in 64 KiB pieces. Each round reads the large file, the next file never
# read before (a cold one: fetched from the registry) and the first ten again; after each read
# the file's page cache is dropped (POSIX_FADV_DONTNEED), so every read goes to the daemon.
# Until CHECK_DIR/stop exists. CHECK_DIR/log gets "ERR", "BAD" and "ROUND" lines; the slowest
# single read is reported as "SLOWEST seconds path".
import hashlib
import os
import sys
import time

root, check = sys.argv[1], sys.argv[2]
expected = []
with open(os.path.join(check, "expected")) as f:
    for line in f:
        digest, path = line.rstrip("\n").split(" ", 1)
        expected.append((digest, os.path.join(root, path)))
log = open(os.path.join(check, "log"), "a", buffering=1)
large, files = expected[0], expected[1:]
warm = files[:10]
slowest = (0.0, "")


def read(entry):
    global slowest
    digest, path = entry
    started = time.monotonic()
    h = hashlib.sha256()
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            while True:
                piece = os.read(fd, 65536)
                if not piece:
                    break
                h.update(piece)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    except OSError as e:
        log.write("ERR %s errno %s %s\n" % (path, e.errno, e.strerror))
        return
    took = time.monotonic() - started
    if took > slowest[0]:
        slowest = (took, path)
    if h.hexdigest() != digest:
        log.write("BAD %s\n" % path)


log.write("START\n")
cold = 10
rounds = 0
while not os.path.exists(os.path.join(check, "stop")):
    read(large)
    if cold < len(files):
        read(files[cold])
        cold += 1
    for entry in warm:
        read(entry)
    rounds += 1
    log.write("ROUND %d\n" % rounds)
log.write("SLOWEST %.3f %s\n" % slowest)
log.write("END %d rounds, %d cold files\n" % (rounds, cold - 10))
