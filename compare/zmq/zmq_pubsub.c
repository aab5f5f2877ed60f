/*
 * zmq_pubsub: one ZeroMQ PUB to N SUB processes over tcp:// on loopback, the
 * counterpart of `ipcbus bench` for compare/README.md.
 *
 *   zmq_pubsub pub --subs N --count C [--size 64] [--port P] [--sync-port Q]
 *                  [--timeout SECS]
 *   zmq_pubsub sub --connect tcp://127.0.0.1:P [--sync tcp://127.0.0.1:Q]
 *                  --count C [--timeout SECS]
 *
 * Start-up (the slow-joiner problem): a SUB only gets what is published after its
 * subscription has reached the PUB, and nothing tells the PUB when that is. So the
 * publisher binds a REP socket beside the PUB (port Q, default P + 1) and, until
 * N subscribers have reported in, alternates sending a one-byte probe on the PUB
 * and polling the REP for 1 ms. A subscriber that has received a probe knows its
 * subscription is in place; it then sends "ready" on a REQ socket and waits for
 * the reply. Once N have done so, the publisher sends C data messages of SIZE bytes
 * as fast as zmq_send takes them, then one end marker. A ZeroMQ connection keeps
 * order, so every data message reaches each subscriber after its last probe.
 *
 * Message kinds, by first byte: 'P' probe, 'D' data (SIZE bytes), 'E' end.
 * High-water marks are 0 (no limit) on both sides, so nothing is dropped for
 * queueing; the PUB lingers up to --timeout at close for queued messages.
 *
 * Each subscriber prints one line,
 *   received=R expected=C secs=S rate=M
 * where S is the time from its first data message to its last and M = R / S
 * (R - 1 intervals would differ by one message in a million). A subscriber gives
 * up after --timeout without its first message, or 10 s without the next one, and
 * still prints its line (exit status 1). The publisher
 * prints sent=C secs=S rate=M for its own send loop, on stderr.
 */
#define _POSIX_C_SOURCE 200809L
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <zmq.h>

#define KIND_PROBE 'P'
#define KIND_DATA 'D'
#define KIND_END 'E'

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static void die(const char *what)
{
    fprintf(stderr, "zmq_pubsub: %s: %s\n", what, zmq_strerror(zmq_errno()));
    exit(2);
}

static void usage(void)
{
    fprintf(stderr,
            "usage: zmq_pubsub pub --subs N --count C [--size BYTES] [--port P]\n"
            "                      [--sync-port Q] [--timeout SECS]\n"
            "       zmq_pubsub sub --connect tcp://HOST:P [--sync tcp://HOST:Q]\n"
            "                      --count C [--timeout SECS]\n"
            "Q defaults to P + 1; --timeout defaults to 120.\n");
    exit(2);
}

static long parse_num(const char *flag, const char *s, long min)
{
    char *end;
    errno = 0;
    long v = strtol(s, &end, 10);
    if (errno != 0 || *end != '\0' || v < min) {
        fprintf(stderr, "zmq_pubsub: %s: bad number '%s'\n", flag, s);
        exit(2);
    }
    return v;
}

static void set_int(void *sock, int opt, int value, const char *what)
{
    if (zmq_setsockopt(sock, opt, &value, sizeof value) != 0)
        die(what);
}

static int run_pub(long subs, long count, long size, long port, long sync_port,
                   long timeout)
{
    char endpoint[64];
    void *ctx = zmq_ctx_new();
    if (!ctx)
        die("zmq_ctx_new");

    void *pub = zmq_socket(ctx, ZMQ_PUB);
    void *rep = zmq_socket(ctx, ZMQ_REP);
    if (!pub || !rep)
        die("zmq_socket");
    set_int(pub, ZMQ_SNDHWM, 0, "ZMQ_SNDHWM");
    set_int(pub, ZMQ_LINGER, (int)(timeout * 1000), "ZMQ_LINGER");
    set_int(rep, ZMQ_LINGER, 0, "ZMQ_LINGER");
    snprintf(endpoint, sizeof endpoint, "tcp://127.0.0.1:%ld", port);
    if (zmq_bind(pub, endpoint) != 0)
        die(endpoint);
    snprintf(endpoint, sizeof endpoint, "tcp://127.0.0.1:%ld", sync_port);
    if (zmq_bind(rep, endpoint) != 0)
        die(endpoint);

    /* Probe until every subscriber has said it receives. */
    const char probe = KIND_PROBE;
    long ready = 0;
    double deadline = now() + (double)timeout;
    zmq_pollitem_t item = { rep, 0, ZMQ_POLLIN, 0 };
    while (ready < subs) {
        if (now() > deadline) {
            fprintf(stderr, "zmq_pubsub pub: only %ld of %ld subscribers ready after %ld s\n",
                    ready, subs, timeout);
            zmq_close(pub);
            zmq_close(rep);
            zmq_ctx_term(ctx);
            return 1;
        }
        if (zmq_send(pub, &probe, 1, 0) != 1)
            die("send probe");
        int n = zmq_poll(&item, 1, 1);
        if (n < 0)
            die("zmq_poll");
        /* Take every request waiting, not just one per probe. */
        while (n > 0) {
            char buf[16];
            if (zmq_recv(rep, buf, sizeof buf, ZMQ_DONTWAIT) < 0) {
                if (zmq_errno() == EAGAIN)
                    break;
                die("recv ready");
            }
            if (zmq_send(rep, "go", 2, 0) != 2)
                die("send go");
            ready++;
        }
    }

    char *payload = malloc((size_t)size);
    if (!payload)
        die("malloc");
    memset(payload, 'x', (size_t)size);
    payload[0] = KIND_DATA;

    double start = now();
    for (long i = 0; i < count; i++) {
        if (zmq_send(pub, payload, (size_t)size, 0) != (int)size)
            die("send data");
    }
    double secs = now() - start;
    const char end = KIND_END;
    if (zmq_send(pub, &end, 1, 0) != 1)
        die("send end");
    fprintf(stderr, "sent=%ld secs=%.6f rate=%.0f\n", count, secs,
            secs > 0 ? (double)count / secs : 0.0);

    free(payload);
    zmq_close(rep);
    zmq_close(pub); /* lingers up to --timeout for the queued messages */
    zmq_ctx_term(ctx);
    return 0;
}

/* "tcp://host:P" -> "tcp://host:(P+1)" */
static void next_port(const char *connect, char *out, size_t len)
{
    const char *colon = strrchr(connect, ':');
    if (!colon || (size_t)(colon - connect) + 8 > len) {
        fprintf(stderr, "zmq_pubsub: cannot derive --sync from '%s'\n", connect);
        exit(2);
    }
    long port = parse_num("--connect", colon + 1, 1);
    snprintf(out, len, "%.*s:%ld", (int)(colon - connect), connect, port + 1);
}

static int run_sub(const char *connect, const char *sync, long count, long timeout)
{
    void *ctx = zmq_ctx_new();
    if (!ctx)
        die("zmq_ctx_new");
    void *sub = zmq_socket(ctx, ZMQ_SUB);
    void *req = zmq_socket(ctx, ZMQ_REQ);
    if (!sub || !req)
        die("zmq_socket");
    set_int(sub, ZMQ_RCVHWM, 0, "ZMQ_RCVHWM");
    set_int(sub, ZMQ_LINGER, 0, "ZMQ_LINGER");
    set_int(req, ZMQ_LINGER, 0, "ZMQ_LINGER");
    set_int(sub, ZMQ_RCVTIMEO, (int)(timeout * 1000), "ZMQ_RCVTIMEO");
    set_int(req, ZMQ_RCVTIMEO, (int)(timeout * 1000), "ZMQ_RCVTIMEO");
    if (zmq_setsockopt(sub, ZMQ_SUBSCRIBE, "", 0) != 0)
        die("ZMQ_SUBSCRIBE");
    if (zmq_connect(sub, connect) != 0)
        die(connect);
    if (zmq_connect(req, sync) != 0)
        die(sync);

    char buf[65536];
    int n;
    /* The first probe says the subscription is in place. */
    do {
        n = zmq_recv(sub, buf, sizeof buf, 0);
        if (n < 0) {
            fprintf(stderr, "zmq_pubsub sub: no probe: %s\n", zmq_strerror(zmq_errno()));
            printf("received=0 expected=%ld secs=0 rate=0\n", count);
            return 1;
        }
    } while (n < 1 || buf[0] != KIND_PROBE);
    if (zmq_send(req, "ready", 5, 0) != 5)
        die("send ready");
    if (zmq_recv(req, buf, sizeof buf, 0) < 0)
        die("recv go");

    long received = 0;
    double first = 0, last = 0;
    int status = 0;
    for (;;) {
        n = zmq_recv(sub, buf, sizeof buf, 0);
        if (n < 0) {
            /* timed out (or interrupted): report what arrived */
            fprintf(stderr, "zmq_pubsub sub: %s after %ld messages\n",
                    zmq_strerror(zmq_errno()), received);
            status = 1;
            break;
        }
        if (n < 1)
            continue;
        if (buf[0] == KIND_DATA) {
            last = now();
            if (received++ == 0) {
                first = last;
                /* from here on, 10 s without a message means the publisher is gone */
                set_int(sub, ZMQ_RCVTIMEO, timeout < 10 ? (int)(timeout * 1000) : 10000,
                        "ZMQ_RCVTIMEO");
            }
        } else if (buf[0] == KIND_END) {
            break;
        }
        /* leftover probes are skipped */
    }
    double secs = last - first;
    printf("received=%ld expected=%ld secs=%.6f rate=%.0f\n", received, count, secs,
           secs > 0 ? (double)received / secs : 0.0);
    fflush(stdout);
    zmq_close(req);
    zmq_close(sub);
    zmq_ctx_term(ctx);
    return status;
}

int main(int argc, char **argv)
{
    if (argc < 2)
        usage();
    const char *mode = argv[1];
    long subs = 1, count = -1, size = 64, port = 5555, sync_port = -1, timeout = 120;
    const char *connect = NULL, *sync = NULL;
    for (int i = 2; i < argc; i++) {
        const char *flag = argv[i];
        if (i + 1 >= argc)
            usage();
        const char *val = argv[++i];
        if (!strcmp(flag, "--subs"))
            subs = parse_num(flag, val, 1);
        else if (!strcmp(flag, "--count"))
            count = parse_num(flag, val, 1);
        else if (!strcmp(flag, "--size"))
            size = parse_num(flag, val, 1);
        else if (!strcmp(flag, "--port"))
            port = parse_num(flag, val, 1);
        else if (!strcmp(flag, "--sync-port"))
            sync_port = parse_num(flag, val, 1);
        else if (!strcmp(flag, "--timeout"))
            timeout = parse_num(flag, val, 1);
        else if (!strcmp(flag, "--connect"))
            connect = val;
        else if (!strcmp(flag, "--sync"))
            sync = val;
        else
            usage();
    }
    if (count < 0 || timeout > 2000000)
        usage();

    if (!strcmp(mode, "pub")) {
        if (size > 65536) {
            fprintf(stderr, "zmq_pubsub: --size at most 65536\n");
            return 2;
        }
        return run_pub(subs, count, size, port, sync_port < 0 ? port + 1 : sync_port,
                       timeout);
    }
    if (!strcmp(mode, "sub")) {
        char derived[256];
        if (!connect)
            usage();
        if (!sync) {
            next_port(connect, derived, sizeof derived);
            sync = derived;
        }
        return run_sub(connect, sync, count, timeout);
    }
    usage();
    return 2;
}
