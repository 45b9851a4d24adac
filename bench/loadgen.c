/* loadgen: Postfix's policy client, as many smtpd processes at once, every reply checked.
 *
 * bench/load.py writes the workload (the requests and, for each, the exact reply expected, from
 * its own model of the maps) and runs this program; bench/run.py builds it with cc. It opens N
 * persistent connections, and each behaves like one smtpd process (postfix-policy.md §A6-A7):
 * one whole request sent, the whole reply read up to its empty line, only then the next request.
 * One epoll loop per thread, one thread by default: the least CPU per request. Most of what is
 * left is the kernel's: a send() and a recv() per request, and on loopback TCP a send() also
 * runs the server's side of the connection; this program's own code is a small part of it.
 *
 *   loadgen --connect inet:127.0.0.1:10040 --workload FILE [--connections 100] [--threads 1]
 *           [--warmup 2] [--duration 10] [--grace 10] [--timeline FILE] [--control]
 *
 * Workload (FILE, or "-" for standard input), integers little-endian:
 *   "PLDLOAD1", u32 count, then count times: u32 length, request; u32 length, expected reply.
 * Connection k starts at request k * (count / connections) and cycles through all of them.
 *
 * --control: once every connection is open, print "ready" and read lines from standard input:
 *   "start START MEASURE STOP"  (CLOCK_MONOTONIC ns: first send, end of warmup, end of window)
 *   "stop STOP"                 (move the end of the window; end of input means stop now)
 * Without it the run starts at once and lasts warmup + duration.
 *
 * Output: one JSON object on standard output (see report()). Latencies are per request, from
 * just before send() to the reply's last byte, on CLOCK_MONOTONIC, kept for every request in the
 * window; percentiles are nearest-rank over all of them (exact, no histogram). --timeline writes
 * (completion ns, latency ns) as two int64 per request in the window, native byte order.
 * Exit status: 0 all right; 1 a wrong reply, a dropped connection, a request unanswered at the
 * end of the grace period, or no reply in the window; 2 a usage or setup error.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#define MAGIC "PLDLOAD1"
#define REPLY_MAX 8192           /* a policy reply is one short line; longer is wrong anyway */
#define REQUEST_MAX (1 << 20)
#define SAMPLES 5                /* mismatches kept, per thread, to show */
#define SAMPLE_BYTES 240
#define RECONNECTS_MAX 1000      /* per thread: after that a dropped connection stays lost */
#define NS 1000000000LL

static void fail(const char *format, ...) {
    va_list args;
    va_start(args, format);
    fputs("loadgen: ", stderr);
    vfprintf(stderr, format, args);
    fputc('\n', stderr);
    va_end(args);
    exit(2);
}

static int64_t now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (int64_t)t.tv_sec * NS + t.tv_nsec;
}

static void sleep_until(int64_t when) {
    struct timespec t = {.tv_sec = when / NS, .tv_nsec = when % NS};
    while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &t, NULL) == EINTR) {
    }
}

static void *grow(void *memory, size_t *capacity, size_t used, size_t size) {
    if (used < *capacity)
        return memory;
    *capacity = *capacity ? *capacity * 2 : 1024;
    memory = realloc(memory, *capacity * size);
    if (memory == NULL)
        fail("out of memory");
    return memory;
}

/* The workload */

struct entry {
    const char *request, *reply;
    uint32_t request_len, reply_len;
};

static struct entry *entries;
static uint32_t entry_count;

static void read_exact(int fd, void *buffer, size_t length, const char *what) {
    char *at = buffer;
    while (length > 0) {
        ssize_t n = read(fd, at, length);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0)
            fail("reading the workload: %s", strerror(errno));
        if (n == 0)
            fail("the workload ends inside %s", what);
        at += n;
        length -= (size_t)n;
    }
}

static uint32_t read_u32(int fd, const char *what) {
    unsigned char b[4];
    read_exact(fd, b, 4, what);
    return (uint32_t)b[0] | (uint32_t)b[1] << 8 | (uint32_t)b[2] << 16 | (uint32_t)b[3] << 24;
}

static char *read_bytes(int fd, uint32_t length, uint32_t limit, const char *what) {
    if (length == 0 || length > limit)
        fail("workload: %s of %" PRIu32 " bytes", what, length);
    char *bytes = malloc(length);
    if (bytes == NULL)
        fail("out of memory");
    read_exact(fd, bytes, length, what);
    return bytes;
}

static void load_workload(const char *path) {
    int fd = strcmp(path, "-") == 0 ? 0 : open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        fail("%s: %s", path, strerror(errno));
    char magic[8];
    read_exact(fd, magic, 8, "the header");
    if (memcmp(magic, MAGIC, 8) != 0)
        fail("%s: not a workload (no " MAGIC " header)", path);
    entry_count = read_u32(fd, "the header");
    if (entry_count == 0)
        fail("%s: no requests", path);
    entries = calloc(entry_count, sizeof *entries);
    if (entries == NULL)
        fail("out of memory");
    for (uint32_t i = 0; i < entry_count; i++) {
        struct entry *e = &entries[i];
        e->request_len = read_u32(fd, "a request");
        e->request = read_bytes(fd, e->request_len, REQUEST_MAX, "a request");
        e->reply_len = read_u32(fd, "a reply");
        e->reply = read_bytes(fd, e->reply_len, REPLY_MAX, "an expected reply");
    }
    if (fd != 0)
        close(fd);
}

/* The server */

static struct sockaddr_storage target;
static socklen_t target_len;

static void parse_target(const char *text) {
    memset(&target, 0, sizeof target);
    if (strncmp(text, "unix:", 5) == 0 && text[5]) {
        struct sockaddr_un *un = (struct sockaddr_un *)&target;
        if (strlen(text + 5) >= sizeof un->sun_path)
            fail("--connect: unix socket path too long");
        un->sun_family = AF_UNIX;
        strcpy(un->sun_path, text + 5);
        target_len = sizeof *un;
        return;
    }
    if (strncmp(text, "inet:", 5) != 0)
        fail("--connect: %s is not inet:HOST:PORT or unix:PATH", text);
    char host[256];
    const char *colon = strrchr(text + 5, ':');
    size_t length = colon ? (size_t)(colon - (text + 5)) : 0;
    if (colon == NULL || length == 0 || length >= sizeof host || !colon[1])
        fail("--connect: %s is not inet:HOST:PORT", text);
    memcpy(host, text + 5, length);
    host[length] = 0;
    char *name = host;
    if (host[0] == '[' && host[length - 1] == ']') { /* inet:[::1]:PORT, as policyd writes it */
        host[length - 1] = 0;
        name = host + 1;
    }
    struct addrinfo hints = {.ai_socktype = SOCK_STREAM, .ai_flags = AI_NUMERICSERV};
    struct addrinfo *found;
    int status = getaddrinfo(name, colon + 1, &hints, &found);
    if (status != 0)
        fail("--connect: %s: %s", text, gai_strerror(status));
    memcpy(&target, found->ai_addr, found->ai_addrlen);
    target_len = found->ai_addrlen;
    freeaddrinfo(found);
}

/* A connected non-blocking socket, or -1. */
static int connect_target(void) {
    int fd = socket(target.ss_family, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return -1;
    struct timeval timeout = {.tv_sec = 10}; /* SO_SNDTIMEO bounds a blocking connect() too */
    setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &timeout, sizeof timeout);
    if (connect(fd, (struct sockaddr *)&target, target_len) < 0) {
        int saved = errno;
        close(fd);
        errno = saved;
        return -1;
    }
    if (target.ss_family != AF_UNIX) {
        /* Postfix writes a request in one write(); without NODELAY a request split by a short
         * write would wait for the delayed ACK, ~40 ms of latency that is not the server's. */
        int one = 1;
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    }
    fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);
    return fd;
}

/* The schedule, shared by every thread; only the end of the window can move once started. */
static int64_t start_at, measure_from;
static _Atomic int64_t stop_at;
static int64_t grace_ns = 10 * NS;
static atomic_int threads_running;

/* One thread: its connections, its epoll loop, its counts */

enum state { IN_FLIGHT, FINISHED, LOST };

struct conn {
    int fd;
    enum state state;
    uint32_t index;     /* the request in flight */
    uint32_t sent;      /* bytes of it the kernel took */
    uint32_t got;       /* bytes of the reply so far */
    int want_out;       /* waiting for room to send the rest of the request */
    int64_t sent_at;
    char reply[REPLY_MAX];
};

struct sample {
    uint32_t index;
    const char *reason;
    uint32_t length;
    char got[SAMPLE_BYTES];
};

struct worker {
    pthread_t thread;
    int epoll;
    struct conn *conns;
    size_t count;
    size_t in_flight;
    uint64_t replies, mismatches, disconnects, unanswered, reconnects;
    struct sample samples[SAMPLES];
    size_t sample_count;
    int64_t *latencies, *finished; /* per reply in the window; finished only with --timeline */
    size_t recorded, capacity, finished_capacity;
    int timeline;
};

static void mismatch(struct worker *w, struct conn *c, const char *reason, const char *got,
                     size_t length) {
    w->mismatches++;
    if (w->sample_count < SAMPLES) {
        struct sample *s = &w->samples[w->sample_count++];
        s->index = c->index;
        s->reason = reason;
        s->length = (uint32_t)(length < SAMPLE_BYTES ? length : SAMPLE_BYTES);
        memcpy(s->got, got, s->length);
    }
}

static void watch(struct worker *w, struct conn *c, int op, uint32_t events) {
    struct epoll_event event = {.events = events, .data.ptr = c};
    if (epoll_ctl(w->epoll, op, c->fd, &event) < 0)
        fail("epoll_ctl: %s", strerror(errno));
}

static void finish(struct worker *w, struct conn *c, enum state state) {
    c->state = state;
    w->in_flight--;
}

static void send_request(struct worker *w, struct conn *c);

/* Close the connection and open a new one that asks the same question again; or, after the end
 * of the window or too many reconnections, give the connection up. */
static void reopen(struct worker *w, struct conn *c) {
    epoll_ctl(w->epoll, EPOLL_CTL_DEL, c->fd, NULL);
    close(c->fd);
    c->fd = -1;
    c->want_out = 0;
    if (now_ns() >= atomic_load_explicit(&stop_at, memory_order_relaxed) ||
        ++w->reconnects > RECONNECTS_MAX || (c->fd = connect_target()) < 0) {
        finish(w, c, LOST);
        return;
    }
    watch(w, c, EPOLL_CTL_ADD, EPOLLIN);
    send_request(w, c);
}

/* The server closed the connection or broke it. Postfix's smtpd reconnects and asks again, and
 * so does this; the drop counts as an error. */
static void dropped(struct worker *w, struct conn *c) {
    w->disconnects++;
    reopen(w, c);
}

static void send_rest(struct worker *w, struct conn *c) {
    const struct entry *e = &entries[c->index];
    while (c->sent < e->request_len) {
        ssize_t n = send(c->fd, e->request + c->sent, e->request_len - c->sent, MSG_NOSIGNAL);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
            break;
        if (n < 0) {
            dropped(w, c);
            return;
        }
        c->sent += (uint32_t)n;
    }
    int want_out = c->sent < e->request_len; /* rare: the server is not reading */
    if (want_out != c->want_out) {
        c->want_out = want_out;
        watch(w, c, EPOLL_CTL_MOD, want_out ? EPOLLIN | EPOLLOUT : EPOLLIN);
    }
}

static void send_request(struct worker *w, struct conn *c) {
    c->sent = 0;
    c->got = 0;
    c->sent_at = now_ns();
    send_rest(w, c);
}

static void record(struct worker *w, int64_t done, int64_t latency) {
    w->latencies = grow(w->latencies, &w->capacity, w->recorded, sizeof *w->latencies);
    w->latencies[w->recorded] = latency;
    if (w->timeline) {
        w->finished = grow(w->finished, &w->finished_capacity, w->recorded, sizeof *w->finished);
        w->finished[w->recorded] = done;
    }
    w->recorded++;
}

/* The end of a reply is its first empty line (Postfix reads attribute lines until one). */
static long reply_end(const char *reply, uint32_t from, uint32_t to) {
    for (uint32_t at = from; at < to; at++) {
        const char *newline = memchr(reply + at, '\n', to - at);
        if (newline == NULL)
            return -1;
        at = (uint32_t)(newline - reply);
        if (at == 0 || reply[at - 1] == '\n')
            return at + 1;
    }
    return -1;
}

static void receive(struct worker *w, struct conn *c) {
    ssize_t n = recv(c->fd, c->reply + c->got, REPLY_MAX - c->got, 0);
    int64_t done = now_ns();
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR))
        return;
    if (n <= 0) {
        dropped(w, c);
        return;
    }
    uint32_t from = c->got;
    c->got += (uint32_t)n;
    long end = reply_end(c->reply, from, c->got);
    const struct entry *e = &entries[c->index];
    if (end < 0) {
        if (c->got < REPLY_MAX)
            return; /* the rest of the reply is on its way */
        /* No way to find where the next reply starts: count it, start a fresh connection. */
        mismatch(w, c, "reply longer than the buffer", c->reply, c->got);
        reopen(w, c);
        return;
    }
    /* The whole read must be exactly the expected reply: bytes after it are a second reply
     * to one request (or garbage), and a reply before the whole request went out is a server
     * that frames by read, not by the empty line. */
    if (c->sent < e->request_len)
        mismatch(w, c, "reply before the whole request was sent", c->reply, c->got);
    else if ((uint32_t)end != c->got)
        mismatch(w, c, "bytes after the reply", c->reply, c->got);
    else if (c->got != e->reply_len || memcmp(c->reply, e->reply, c->got) != 0)
        mismatch(w, c, "wrong reply", c->reply, c->got);
    w->replies++;
    int64_t stop = atomic_load_explicit(&stop_at, memory_order_relaxed);
    if (measure_from <= done && done < stop)
        record(w, done, done - c->sent_at);
    if (c->sent < e->request_len) { /* the rest of the request would start a new one */
        reopen(w, c);
        return;
    }
    if (done >= stop) {
        /* Anything still arriving now answers no request of ours. */
        char extra[SAMPLE_BYTES];
        ssize_t more = recv(c->fd, extra, sizeof extra, MSG_DONTWAIT);
        if (more > 0)
            mismatch(w, c, "bytes after the last reply", extra, (size_t)more);
        epoll_ctl(w->epoll, EPOLL_CTL_DEL, c->fd, NULL);
        finish(w, c, FINISHED);
        return;
    }
    c->index = c->index + 1 < entry_count ? c->index + 1 : 0;
    send_request(w, c);
}

static void *run_worker(void *arg) {
    struct worker *w = arg;
    struct epoll_event events[256];
    sleep_until(start_at);
    for (size_t i = 0; i < w->count; i++)
        send_request(w, &w->conns[i]);
    while (w->in_flight > 0) {
        int64_t now = now_ns();
        int64_t give_up = atomic_load_explicit(&stop_at, memory_order_relaxed) + grace_ns;
        if (now >= give_up) {
            w->unanswered += w->in_flight; /* no reply within the grace period after the end */
            break;
        }
        int64_t wait_ms = (give_up - now) / 1000000 + 1;
        int n = epoll_wait(w->epoll, events, 256, wait_ms < 100 ? (int)wait_ms : 100);
        if (n < 0 && errno != EINTR)
            fail("epoll_wait: %s", strerror(errno));
        for (int i = 0; i < n; i++) {
            struct conn *c = events[i].data.ptr;
            if (c->state != IN_FLIGHT)
                continue;
            if (events[i].events & EPOLLOUT && c->sent < entries[c->index].request_len)
                send_rest(w, c);
            if (c->state == IN_FLIGHT && events[i].events & (EPOLLIN | EPOLLERR | EPOLLHUP))
                receive(w, c);
        }
    }
    atomic_fetch_sub(&threads_running, 1);
    return NULL;
}

/* Control and report */

/* This process's CPU so far, all threads: user (its own code) and system (the kernel's socket
 * work on its behalf, which on loopback includes delivering each request to the server). */
struct cpu {
    double user, sys;
};

static struct cpu cpu_now(void) {
    struct rusage usage;
    getrusage(RUSAGE_SELF, &usage);
    return (struct cpu){
        (double)usage.ru_utime.tv_sec + (double)usage.ru_utime.tv_usec / 1e6,
        (double)usage.ru_stime.tv_sec + (double)usage.ru_stime.tv_usec / 1e6,
    };
}

static int64_t parse_ns(const char *text) {
    char *end;
    errno = 0;
    long long value = strtoll(text, &end, 10);
    if (errno || end == text)
        fail("control: bad time %s", text);
    return value;
}

/* Reads control lines until the workers are done; measures this program's CPU over the window. */
static void control(int reading, struct cpu *window_cpu, double *window_seconds) {
    char line[256];
    size_t used = 0;
    int64_t cpu_from = 0, cpu_to = 0;
    int have_from = 0, have_to = 0;
    struct cpu cpu_at_from = {0, 0}, cpu_at_to = {0, 0};
    struct pollfd input = {.fd = reading ? 0 : -1, .events = POLLIN};
    while (atomic_load(&threads_running) > 0) {
        int64_t now = now_ns(), stop = atomic_load(&stop_at);
        if (!have_from && now >= measure_from) {
            cpu_at_from = cpu_now();
            cpu_from = now;
            have_from = 1;
        }
        if (have_from && !have_to && now >= stop) {
            cpu_at_to = cpu_now();
            cpu_to = now;
            have_to = 1;
        }
        int64_t next = !have_from ? measure_from : !have_to ? stop : now + 20000000;
        int64_t wait_ms = (next - now) / 1000000 + 1;
        if (poll(&input, 1, wait_ms < 20 ? (int)wait_ms : 20) <= 0 || input.fd < 0)
            continue;
        ssize_t n = read(0, line + used, sizeof line - 1 - used);
        if (n <= 0) { /* whoever controls us is gone: end the window now */
            input.fd = -1;
            int64_t later = atomic_load(&stop_at);
            if (later > now_ns())
                atomic_store(&stop_at, now_ns());
            continue;
        }
        used += (size_t)n;
        line[used] = 0;
        char *newline;
        while ((newline = strchr(line, '\n')) != NULL) {
            *newline = 0;
            if (strncmp(line, "stop ", 5) == 0)
                atomic_store(&stop_at, parse_ns(line + 5));
            else if (line[0])
                fail("control: unknown line: %s", line);
            used -= (size_t)(newline + 1 - line);
            memmove(line, newline + 1, used + 1);
        }
        if (used == sizeof line - 1)
            fail("control: line too long");
    }
    if (have_from && !have_to) { /* every connection ended before the end of the window */
        cpu_at_to = cpu_now();
        cpu_to = now_ns();
    }
    *window_cpu = (struct cpu){cpu_at_to.user - cpu_at_from.user, cpu_at_to.sys - cpu_at_from.sys};
    *window_seconds = have_from ? (double)(cpu_to - cpu_from) / NS : 0;
}

static void read_start(void) {
    char line[256];
    size_t used = 0;
    while (used == 0 || line[used - 1] != '\n') {
        if (used == sizeof line - 1)
            fail("control: line too long");
        ssize_t n = read(0, line + used, 1); /* byte by byte: leave the next line unread */
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            fail("control: no start line");
        used += (size_t)n;
    }
    line[used] = 0;
    long long a, b, c;
    if (sscanf(line, "start %lld %lld %lld", &a, &b, &c) != 3 || a > b || b > c)
        fail("control: expected \"start START MEASURE STOP\", got %s", line);
    start_at = a;
    measure_from = b;
    atomic_store(&stop_at, c);
}

static int compare(const void *a, const void *b) {
    int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;
    return (x > y) - (x < y);
}

/* Nearest rank: the smallest value with at least this share (per million) at or below it. */
static int64_t rank(const int64_t *sorted, size_t count, uint64_t per_million) {
    if (count == 0)
        return -1;
    uint64_t r = (per_million * count + 999999) / 1000000;
    return sorted[(r < 1 ? 1 : r) - 1];
}

static void print_string(const char *bytes, size_t length) {
    putchar('"');
    for (size_t i = 0; i < length; i++) {
        unsigned char b = (unsigned char)bytes[i];
        if (b == '"' || b == '\\')
            printf("\\%c", b);
        else if (b == '\n')
            fputs("\\n", stdout);
        else if (b < 0x20 || b >= 0x7f) /* bytes as code points: Latin-1 decoding recovers them */
            printf("\\u%04x", b);
        else
            putchar(b);
    }
    putchar('"');
}

static int report(struct worker *workers, int threads, size_t connections, const char *timeline,
                  struct cpu window, double window_seconds) {
    uint64_t replies = 0, mismatches = 0, disconnects = 0, unanswered = 0;
    size_t recorded = 0;
    for (int t = 0; t < threads; t++) {
        replies += workers[t].replies;
        mismatches += workers[t].mismatches;
        disconnects += workers[t].disconnects;
        unanswered += workers[t].unanswered;
        recorded += workers[t].recorded;
    }
    if (timeline) {
        FILE *out = fopen(timeline, "wb");
        if (out == NULL)
            fail("%s: %s", timeline, strerror(errno));
        for (int t = 0; t < threads; t++)
            for (size_t i = 0; i < workers[t].recorded; i++) {
                int64_t pair[2] = {workers[t].finished[i], workers[t].latencies[i]};
                fwrite(pair, sizeof pair, 1, out);
            }
        if (fclose(out) != 0)
            fail("%s: %s", timeline, strerror(errno));
    }
    int64_t *all = malloc((recorded ? recorded : 1) * sizeof *all);
    if (all == NULL)
        fail("out of memory");
    size_t at = 0;
    for (int t = 0; t < threads; t++) {
        memcpy(all + at, workers[t].latencies, workers[t].recorded * sizeof *all);
        at += workers[t].recorded;
    }
    qsort(all, recorded, sizeof *all, compare);
    int64_t stop = atomic_load(&stop_at);
    double seconds = (double)(stop - measure_from) / NS;
    uint64_t errors = mismatches + disconnects + unanswered;
    printf("{\"requests\": %zu, \"seconds\": %.6f, \"rps\": %.1f, \"replies\": %" PRIu64
           ", \"window_ns\": [%" PRId64 ", %" PRId64 "], \"connections\": %zu, \"threads\": %d",
           recorded, seconds, seconds > 0 ? (double)recorded / seconds : 0.0, replies, measure_from, stop,
           connections, threads);
    static const struct { const char *name; uint64_t per_million; } points[] = {
        {"min", 0}, {"p50", 500000}, {"p90", 900000}, {"p99", 990000},
        {"p999", 999000}, {"p9999", 999900}, {"max", 1000000},
    };
    printf(", \"latency_ns\": {");
    for (size_t i = 0; i < sizeof points / sizeof points[0]; i++)
        printf("%s\"%s\": %" PRId64, i ? ", " : "", points[i].name,
               recorded ? (points[i].per_million ? rank(all, recorded, points[i].per_million)
                                                 : all[0])
                        : -1);
    printf("}, \"errors\": %" PRIu64 ", \"mismatches\": %" PRIu64 ", \"disconnects\": %" PRIu64
           ", \"unanswered\": %" PRIu64 ", \"mismatch_samples\": [",
           errors, mismatches, disconnects, unanswered);
    int shown = 0;
    for (int t = 0; t < threads; t++)
        for (size_t i = 0; i < workers[t].sample_count && shown < SAMPLES; i++, shown++) {
            const struct sample *s = &workers[t].samples[i];
            printf("%s{\"index\": %" PRIu32 ", \"reason\": \"%s\", \"expected\": ", shown ? ", " : "",
                   s->index, s->reason);
            print_string(entries[s->index].reply, entries[s->index].reply_len);
            printf(", \"got\": ");
            print_string(s->got, s->length);
            putchar('}');
        }
    /* Per request in the window; "cores" is the share of one core over the window. */
    struct cpu total = cpu_now();
    double cpu = window.user + window.sys, per = recorded ? 1e6 / (double)recorded : 0.0;
    printf("], \"cpu\": {\"window_s\": %.4f, \"cores\": %.4f, \"us_per_request\": %.3f, "
           "\"user_us_per_request\": %.3f, \"sys_us_per_request\": %.3f, \"total_s\": %.4f}}\n",
           cpu, window_seconds > 0 ? cpu / window_seconds : 0.0, cpu * per, window.user * per,
           window.sys * per, total.user + total.sys);
    fflush(stdout);
    free(all);
    return errors || recorded == 0 ? 1 : 0;
}

static double parse_seconds(const char *name, const char *text) {
    char *end;
    double value = strtod(text, &end);
    if (end == text || *end || value < 0)
        fail("%s: %s is not a number of seconds", name, text);
    return value;
}

static long parse_count(const char *name, const char *text, long most) {
    char *end;
    long value = strtol(text, &end, 10);
    if (end == text || *end || value < 1 || value > most)
        fail("%s: %s is not a number from 1 to %ld", name, text, most);
    return value;
}

int main(int argc, char **argv) {
    const char *connect_to = NULL, *workload = NULL, *timeline = NULL;
    long connections = 100, threads = 1;
    double warmup = 2, duration = 10;
    int controlled = 0;
    for (int i = 1; i < argc; i++) {
        const char *arg = argv[i], *value = i + 1 < argc ? argv[i + 1] : NULL;
        if (strcmp(arg, "--control") == 0) {
            controlled = 1;
            continue;
        }
        if (value == NULL)
            fail("usage: see the comment at the top of loadgen.c (%s needs a value)", arg);
        i++;
        if (strcmp(arg, "--connect") == 0)
            connect_to = value;
        else if (strcmp(arg, "--workload") == 0)
            workload = value;
        else if (strcmp(arg, "--timeline") == 0)
            timeline = value;
        else if (strcmp(arg, "--connections") == 0)
            connections = parse_count(arg, value, 100000);
        else if (strcmp(arg, "--threads") == 0)
            threads = parse_count(arg, value, 64);
        else if (strcmp(arg, "--warmup") == 0)
            warmup = parse_seconds(arg, value);
        else if (strcmp(arg, "--duration") == 0)
            duration = parse_seconds(arg, value);
        else if (strcmp(arg, "--grace") == 0)
            grace_ns = (int64_t)(parse_seconds(arg, value) * NS);
        else
            fail("unknown option %s", arg);
    }
    if (connect_to == NULL || workload == NULL)
        fail("usage: loadgen --connect inet:HOST:PORT|unix:PATH --workload FILE|- [options]");
    if (threads > connections)
        threads = connections;
    signal(SIGPIPE, SIG_IGN);
    parse_target(connect_to);
    load_workload(workload);

    /* Every connection is open before the clock starts, as smtpd processes would hold them. */
    struct worker *workers = calloc((size_t)threads, sizeof *workers);
    if (workers == NULL)
        fail("out of memory");
    uint32_t step = entry_count / (uint32_t)connections ? entry_count / (uint32_t)connections : 1;
    for (long t = 0; t < threads; t++) {
        struct worker *w = &workers[t];
        w->count = (size_t)(connections / threads + (t < connections % threads));
        w->in_flight = w->count;
        w->timeline = timeline != NULL;
        w->conns = calloc(w->count, sizeof *w->conns);
        w->epoll = epoll_create1(EPOLL_CLOEXEC);
        if (w->conns == NULL || w->epoll < 0)
            fail("setting up: %s", strerror(errno));
    }
    for (long k = 0; k < connections; k++) {
        struct worker *w = &workers[k % threads];
        struct conn *c = &w->conns[k / threads];
        c->index = (uint32_t)(((uint64_t)k * step) % entry_count);
        c->fd = connect_target();
        if (c->fd < 0)
            fail("connection %ld to %s: %s", k + 1, connect_to, strerror(errno));
        watch(w, c, EPOLL_CTL_ADD, EPOLLIN);
    }
    if (controlled) {
        puts("ready");
        fflush(stdout);
        read_start();
    } else {
        start_at = now_ns();
        measure_from = start_at + (int64_t)(warmup * NS);
        atomic_store(&stop_at, measure_from + (int64_t)(duration * NS));
    }
    atomic_store(&threads_running, (int)threads);
    for (long t = 0; t < threads; t++)
        if (pthread_create(&workers[t].thread, NULL, run_worker, &workers[t]) != 0)
            fail("pthread_create failed");
    struct cpu window_cpu;
    double window_seconds;
    control(controlled, &window_cpu, &window_seconds);
    for (long t = 0; t < threads; t++)
        pthread_join(workers[t].thread, NULL);
    return report(workers, (int)threads, (size_t)connections, timeline, window_cpu, window_seconds);
}
