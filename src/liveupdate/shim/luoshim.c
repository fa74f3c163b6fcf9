/* SPDX-License-Identifier: GPL-2.0-only */
/*
 * libluoshim.so - run unmodified C programs that use /dev/liveupdate against luod.
 *
 * LD_PRELOAD=libluoshim.so turns open("/dev/liveupdate") into a connection to
 * luod's device socket, and ioctl() on luod's device and session fds into one
 * request and one reply of the wire protocol (docs/concepts/wire.md): the very
 * bytes the kernel would copy in, the very bytes it would copy out, the errno
 * it would set. Everything else goes to libc untouched.
 *
 * Which fds are luod's is decided from the fd itself, never from memory of
 * the parent (an exec'd program inherits fds and nothing else), and is
 * re-checked whenever the fd's inode changes (a closed fd's number reused):
 *
 *   1. it is an AF_UNIX SOCK_SEQPACKET socket, and
 *   2. its peer is bound to the path the shim would connect to for
 *      /dev/liveupdate (a device connection), or the process at the other end
 *      (SO_PEERCRED) is named "luod" in /proc/PID/comm (session fds are
 *      socketpairs made by luod), or the shim itself made it (open, or the fd
 *      returned by CREATE_SESSION/RETRIEVE_SESSION).
 *
 * The verdict is cached per fd with the socket's inode number; sockets live
 * on one pseudo filesystem whose inode numbers only grow, so a new socket on
 * a reused fd number never matches an old entry.
 *
 * Shared fds (wire 1.1 channels). Processes sharing one luod fd would share
 * one queue of replies. So only the process that got the fd from luod (it
 * opened the device, or CREATE_SESSION/RETRIEVE_SESSION returned it) calls on
 * it directly; any other process (a forked child, an exec'd program, a
 * receiver of SCM_RIGHTS) binds a channel of its own at its first call: one
 * end of a socketpair sent in a BIND message, on which luod then answers that
 * process alone. Threads of one process take turns per fd (striped mutexes),
 * as the kernel's own ioctls take the session's mutex.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <sys/un.h>
#include <unistd.h>

#define KERNEL_DEVICE "/dev/liveupdate"
#define SYSTEM_SOCKET "/run/liveupdate/device"
#define DEVICE_ENV "LIVEUPDATE_DEVICE"

#define LUO_TYPE 0xBA
#define HELLO_MAGIC 0x444F554CU
#define PROTOCOL_VERSION 1U
#define HELLO_SIZE 16
#define HEADER_SIZE 8
/* wire 1.1: the BIND message's cmd and its argument (u32 size, u32 flags). */
#define BIND_CMD 0x4201U
#define BIND_SIZE 8U
#define MAX_ARG_LEN 65536U
#define FD_OFFSET 4

/* The ioctls whose struct carries an fd: one in, or one out (wire.md). */
#define CMD_CREATE_SESSION 0xBA00U
#define CMD_RETRIEVE_SESSION 0xBA01U
#define CMD_PRESERVE_FD 0xBA40U
#define CMD_RETRIEVE_FD 0xBA41U
#define CMD_LIST_SESSIONS 0xBA82U
#define CMD_REGISTER_PARTICIPANT 0xBA83U

/* Verdict cache: one word per fd, (socket inode << 3) | OWN | LUOD | KNOWN.
 * OWN: this process got the fd from luod and calls on it directly. */
#define CACHE_FDS 65536
#define KNOWN 1ULL
#define LUOD 2ULL
#define OWN 4ULL
#define INODE_SHIFT 3
static uint64_t verdicts[CACHE_FDS];

/* This process's channel per shared luod fd: the shared socket's inode, and
 * the channel's fd (+1, so that 0 is "none") and inode. Guarded by the fd's
 * stripe. The channel's inode is checked before each use: a program that
 * closes every fd it does not know (closefrom) may have closed it. */
struct channel {
	uint64_t shared_ino;
	uint64_t ino;
	int fd_plus_1;
};
static struct channel channels[CACHE_FDS];

#define STRIPES 256
static pthread_mutex_t stripes[STRIPES];
/* The highest fd number remembered: what a fork's child handler walks. */
static int highest_fd;

typedef int (*open_fn)(const char *, int, ...);
typedef int (*openat_fn)(int, const char *, int, ...);
typedef int (*open2_fn)(const char *, int);
typedef int (*openat2_fn)(int, const char *, int);
typedef int (*ioctl_fn)(int, unsigned long, ...);

static void *next(const char *name)
{
	return dlsym(RTLD_NEXT, name);
}

/* The shim's own closes bypass its close() wrapper below, which takes a
 * stripe's mutex: the shim may already hold it. */
static int raw_close(int fd)
{
	return (int)syscall(SYS_close, fd);
}

/* -- where luod is (as liveupdate.paths.resolve_device) ---------------------- */

static int is_char_device(const char *path)
{
	struct stat st;

	return stat(path, &st) == 0 && S_ISCHR(st.st_mode);
}

/* The socket to connect to for /dev/liveupdate, or 0 when the real device
 * (or a character device named by LIVEUPDATE_DEVICE) must be opened instead. */
static int socket_path(char *out, size_t len)
{
	const char *env = getenv(DEVICE_ENV);
	int n;

	if (env && *env) {
		if (is_char_device(env))
			return 0;
		n = snprintf(out, len, "%s", env);
	} else if (is_char_device(KERNEL_DEVICE)) {
		return 0;
	} else if (geteuid() == 0) {
		n = snprintf(out, len, "%s", SYSTEM_SOCKET);
	} else {
		const char *runtime = getenv("XDG_RUNTIME_DIR");

		if (runtime && *runtime)
			n = snprintf(out, len, "%s/liveupdate/device", runtime);
		else
			n = snprintf(out, len, "/tmp/liveupdate-%u/liveupdate/device",
				     (unsigned int)geteuid());
	}
	return n > 0 && (size_t)n < len;
}

/* -- recognising luod's fds ------------------------------------------------- */

static void remember(int fd, int luod, int own)
{
	struct stat st;

	if (fd < 0 || fd >= CACHE_FDS || fstat(fd, &st) != 0)
		return;
	__atomic_store_n(&verdicts[fd],
			 ((uint64_t)st.st_ino << INODE_SHIFT) | KNOWN | (luod ? LUOD : 0) |
				 (own ? OWN : 0),
			 __ATOMIC_RELAXED);
	if (fd > __atomic_load_n(&highest_fd, __ATOMIC_RELAXED))
		__atomic_store_n(&highest_fd, fd, __ATOMIC_RELAXED);
}

static int peer_is_named_luod(int fd)
{
	struct ucred cred;
	socklen_t len = sizeof(cred);
	char path[64], comm[32];
	ssize_t n;
	int proc;

	if (getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cred, &len) != 0 || cred.pid <= 0)
		return 0;
	snprintf(path, sizeof(path), "/proc/%d/comm", (int)cred.pid);
	proc = open(path, O_RDONLY | O_CLOEXEC);
	if (proc < 0)
		return 0;
	n = read(proc, comm, sizeof(comm) - 1);
	raw_close(proc);
	return n == 5 && memcmp(comm, "luod\n", 5) == 0;
}

static int peer_is_device_socket(int fd)
{
	struct sockaddr_un addr;
	socklen_t len = sizeof(addr);
	char want[sizeof(addr.sun_path)];
	size_t have;

	memset(&addr, 0, sizeof(addr));
	if (getpeername(fd, (struct sockaddr *)&addr, &len) != 0)
		return 0;
	if (len <= offsetof(struct sockaddr_un, sun_path) || addr.sun_path[0] == '\0')
		return 0; /* unnamed (a socketpair) or abstract */
	have = strnlen(addr.sun_path, len - offsetof(struct sockaddr_un, sun_path));
	if (!socket_path(want, sizeof(want)))
		return 0;
	return strlen(want) == have && memcmp(want, addr.sun_path, have) == 0;
}

static int is_seqpacket_unix(int fd)
{
	int domain = 0, type = 0;
	socklen_t len = sizeof(int);

	if (getsockopt(fd, SOL_SOCKET, SO_DOMAIN, &domain, &len) != 0 || domain != AF_UNIX)
		return 0;
	len = sizeof(int);
	return getsockopt(fd, SOL_SOCKET, SO_TYPE, &type, &len) == 0 && type == SOCK_SEQPACKET;
}

/* Whether fd is one of luod's device or session fds. Keeps errno. */
static int is_luod_fd(int fd)
{
	int saved = errno, luod;
	struct stat st;
	uint64_t entry;

	if (fstat(fd, &st) != 0 || !S_ISSOCK(st.st_mode)) {
		errno = saved;
		return 0;
	}
	if (fd < CACHE_FDS) {
		entry = __atomic_load_n(&verdicts[fd], __ATOMIC_RELAXED);
		if ((entry & KNOWN) && (entry >> INODE_SHIFT) == (uint64_t)st.st_ino) {
			errno = saved;
			return (entry & LUOD) != 0;
		}
	}
	luod = is_seqpacket_unix(fd) && (peer_is_device_socket(fd) || peer_is_named_luod(fd));
	remember(fd, luod, 0);
	errno = saved;
	return luod;
}

/* -- open -------------------------------------------------------------------- */

/* Connect to luod and read its hello: an fd, or -1 with the open's errno. */
static int luod_open(const char *path, int flags)
{
	struct sockaddr_un addr;
	unsigned char hello[HELLO_SIZE + 1];
	uint32_t magic, version;
	int32_t status;
	ssize_t n;
	int fd, err;

	memset(&addr, 0, sizeof(addr));
	addr.sun_family = AF_UNIX;
	if (strlen(path) >= sizeof(addr.sun_path)) {
		errno = ENAMETOOLONG;
		return -1;
	}
	strcpy(addr.sun_path, path);
	fd = socket(AF_UNIX, SOCK_SEQPACKET | ((flags & O_CLOEXEC) ? SOCK_CLOEXEC : 0), 0);
	if (fd < 0)
		return -1;
	while (connect(fd, (struct sockaddr *)&addr, sizeof(addr)) != 0) {
		if (errno == EINTR)
			continue;
		goto fail;
	}
	do
		n = recv(fd, hello, sizeof(hello), 0);
	while (n < 0 && errno == EINTR);
	if (n < 0)
		goto fail;
	if (n == 0) {
		errno = ENODEV; /* luod closed the connection (it is stopping) */
		goto fail;
	}
	/* The last word holds the features (1.1); none is needed to open. */
	memcpy(&magic, hello, 4);
	memcpy(&version, hello + 4, 4);
	memcpy(&status, hello + 8, 4);
	if (n != HELLO_SIZE || magic != HELLO_MAGIC || version != PROTOCOL_VERSION) {
		errno = EPROTO;
		goto fail;
	}
	if (status < 0) {
		errno = -status; /* EBUSY: another opener; EIO: the handover failed */
		goto fail;
	}
	remember(fd, 1, 1);
	return fd;
fail:
	err = errno;
	raw_close(fd);
	errno = err;
	return -1;
}

/* An fd when path is the device and luod serves it; -2 to let libc open it. */
static int shim_open(const char *path, int flags)
{
	char sock[sizeof(((struct sockaddr_un *)0)->sun_path)];

	if (path == NULL || strcmp(path, KERNEL_DEVICE) != 0)
		return -2;
	if (!socket_path(sock, sizeof(sock)))
		return -2;
	return luod_open(sock, flags);
}

static mode_t mode_arg(int flags, va_list ap)
{
	return (flags & (O_CREAT | __O_TMPFILE)) ? (mode_t)va_arg(ap, int) : 0;
}

#define OPEN_WRAPPER(name)                                              \
	int name(const char *path, int flags, ...)                     \
	{                                                               \
		static open_fn real;                                    \
		va_list ap;                                             \
		mode_t mode;                                            \
		int fd = shim_open(path, flags);                        \
									\
		if (fd != -2)                                           \
			return fd;                                      \
		va_start(ap, flags);                                    \
		mode = mode_arg(flags, ap);                             \
		va_end(ap);                                             \
		if (!real)                                              \
			real = (open_fn)next(#name);                    \
		return real(path, flags, mode);                         \
	}

#define OPENAT_WRAPPER(name)                                            \
	int name(int dirfd, const char *path, int flags, ...)          \
	{                                                               \
		static openat_fn real;                                  \
		va_list ap;                                             \
		mode_t mode;                                            \
		int fd = shim_open(path, flags);                        \
									\
		if (fd != -2)                                           \
			return fd;                                      \
		va_start(ap, flags);                                    \
		mode = mode_arg(flags, ap);                             \
		va_end(ap);                                             \
		if (!real)                                              \
			real = (openat_fn)next(#name);                  \
		return real(dirfd, path, flags, mode);                  \
	}

OPEN_WRAPPER(open)
OPEN_WRAPPER(open64)
OPENAT_WRAPPER(openat)
OPENAT_WRAPPER(openat64)

/* _FORTIFY_SOURCE's checked variants (no mode argument). */
#define OPEN2_WRAPPER(name)                                             \
	int name(const char *path, int flags)                          \
	{                                                               \
		static open2_fn real;                                   \
		int fd = shim_open(path, flags);                        \
									\
		if (fd != -2)                                           \
			return fd;                                      \
		if (!real)                                              \
			real = (open2_fn)next(#name);                   \
		return real(path, flags);                               \
	}

#define OPENAT2_WRAPPER(name)                                           \
	int name(int dirfd, const char *path, int flags)               \
	{                                                               \
		static openat2_fn real;                                 \
		int fd = shim_open(path, flags);                        \
									\
		if (fd != -2)                                           \
			return fd;                                      \
		if (!real)                                              \
			real = (openat2_fn)next(#name);                 \
		return real(dirfd, path, flags);                        \
	}

OPEN2_WRAPPER(__open_2)
OPEN2_WRAPPER(__open64_2)
OPENAT2_WRAPPER(__openat_2)
OPENAT2_WRAPPER(__openat64_2)

/* -- ioctl ------------------------------------------------------------------- */

/* Copy from the caller's memory as the kernel's copy_from_user would: a
 * bad address is an error (EFAULT), never a crash of the program. */
static int copy_in(void *dst, const void *src, size_t len)
{
	struct iovec local = { dst, len }, remote = { (void *)src, len };

	if (len == 0)
		return 0;
	return process_vm_readv(getpid(), &local, 1, &remote, 1, 0) == (ssize_t)len ? 0 : -1;
}

static int copy_out(void *dst, const void *src, size_t len)
{
	struct iovec local = { (void *)src, len }, remote = { dst, len };

	if (len == 0)
		return 0;
	return process_vm_writev(getpid(), &local, 1, &remote, 1, 0) == (ssize_t)len ? 0 : -1;
}

static int peer_gone(int err)
{
	return err == EPIPE || err == ECONNRESET || err == ENOTCONN || err == ECONNREFUSED;
}

static int send_request(int fd, const unsigned char *msg, size_t len, int attach)
{
	union {
		char buf[CMSG_SPACE(sizeof(int))];
		struct cmsghdr align;
	} anc;
	struct iovec iov = { (void *)msg, len };
	struct msghdr mh = { .msg_iov = &iov, .msg_iovlen = 1 };
	struct cmsghdr *cm;
	ssize_t n;

	if (attach >= 0) {
		memset(&anc, 0, sizeof(anc));
		mh.msg_control = anc.buf;
		mh.msg_controllen = sizeof(anc.buf);
		cm = CMSG_FIRSTHDR(&mh);
		cm->cmsg_level = SOL_SOCKET;
		cm->cmsg_type = SCM_RIGHTS;
		cm->cmsg_len = CMSG_LEN(sizeof(int));
		memcpy(CMSG_DATA(cm), &attach, sizeof(int));
	}
	do
		n = sendmsg(fd, &mh, MSG_NOSIGNAL);
	while (n < 0 && errno == EINTR);
	if (n < 0 && errno == EBADF && attach >= 0) {
		/* The caller's fd is not open: send without it and let luod answer in
		 * its check order (EEXIST before EBADF), as the Python client does. */
		return send_request(fd, msg, len, -1);
	}
	return n < 0 ? -1 : 0;
}

/* Receive one reply; its length (0: luod hung up), fds in *got (-1: none). */
static ssize_t recv_reply(int fd, unsigned char *buf, size_t len, int *got, int *flags)
{
	union {
		char buf[CMSG_SPACE(sizeof(int) * 4)];
		struct cmsghdr align;
	} anc;
	struct iovec iov = { buf, len };
	struct msghdr mh;
	struct cmsghdr *cm;
	struct pollfd pfd = { fd, POLLIN, 0 };
	ssize_t n;
	size_t i, count;
	int one;

	*got = -1;
	for (;;) {
		memset(&mh, 0, sizeof(mh));
		mh.msg_iov = &iov;
		mh.msg_iovlen = 1;
		mh.msg_control = anc.buf;
		mh.msg_controllen = sizeof(anc.buf);
		n = recvmsg(fd, &mh, MSG_CMSG_CLOEXEC | MSG_TRUNC);
		if (n >= 0)
			break;
		if (errno == EAGAIN || errno == EWOULDBLOCK)
			poll(&pfd, 1, -1); /* the caller made the fd non-blocking */
		else if (errno != EINTR)
			return -1;
	}
	*flags = mh.msg_flags;
	for (cm = CMSG_FIRSTHDR(&mh); cm; cm = CMSG_NXTHDR(&mh, cm)) {
		if (cm->cmsg_level != SOL_SOCKET || cm->cmsg_type != SCM_RIGHTS)
			continue;
		count = (cm->cmsg_len - CMSG_LEN(0)) / sizeof(int);
		for (i = 0; i < count; i++) {
			memcpy(&one, CMSG_DATA(cm) + i * sizeof(int), sizeof(int));
			if (*got < 0)
				*got = one;
			else
				raw_close(one); /* wire.md: at most one; never leak extras */
		}
	}
	return n;
}

static int fail(int err)
{
	errno = err;
	return -1;
}

/* The shape of every LUO number: the type byte 0xBA, no direction or size bits. */
static int luo_shaped(unsigned int cmd)
{
	return ((cmd >> 8) & 0xFF) == LUO_TYPE && (cmd >> 16) == 0;
}

/* -- channels (wire 1.1) ------------------------------------------------------ */

static pthread_mutex_t *stripe(int fd)
{
	return &stripes[(unsigned int)fd % STRIPES];
}

static uint64_t inode_of(int fd)
{
	struct stat st;

	return fstat(fd, &st) == 0 ? (uint64_t)st.st_ino : 0;
}

/* Forget fd's channel, closing it if the fd number still holds it. */
static void drop_channel(int fd)
{
	struct channel *ch = &channels[fd];
	int chan = ch->fd_plus_1 - 1;

	if (chan >= 0 && inode_of(chan) == ch->ino)
		raw_close(chan);
	memset(ch, 0, sizeof(*ch));
}

/* Bind a channel to the shared fd: the channel's fd, fd itself when luod
 * predates channels (it answers the BIND ENOTTY on fd), or -1 with errno. */
static int bind_channel(int fd)
{
	unsigned char msg[HEADER_SIZE + BIND_SIZE], reply[HEADER_SIZE + 1];
	uint32_t cmd = BIND_CMD, arg_len = BIND_SIZE, size = BIND_SIZE, flags = 0;
	int pair[2], got, mflags, err;
	int32_t ret;
	ssize_t n;

	if (socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, pair) != 0)
		return -1;
	memcpy(msg, &cmd, 4);
	memcpy(msg + 4, &arg_len, 4);
	memcpy(msg + 8, &size, 4);
	memcpy(msg + 12, &flags, 4);
	if (send_request(fd, msg, sizeof(msg), pair[1]) != 0) {
		err = peer_gone(errno) ? ENODEV : errno;
		raw_close(pair[0]);
		raw_close(pair[1]);
		return fail(err);
	}
	raw_close(pair[1]);
	/* The acknowledgement comes on the channel; a refusal closes it (EOF)
	 * and is answered on fd, after the close. */
	n = recv_reply(pair[0], reply, sizeof(reply), &got, &mflags);
	if (got >= 0)
		raw_close(got);
	if (n == HEADER_SIZE) {
		memcpy(&ret, reply, 4);
		if (ret == 0)
			return pair[0];
	}
	raw_close(pair[0]);
	if (n != 0)
		return fail(n < 0 ? ENODEV : EPROTO);
	n = recv_reply(fd, reply, sizeof(reply), &got, &mflags);
	if (got >= 0)
		raw_close(got);
	if (n <= 0)
		return fail(ENODEV);
	if (n != HEADER_SIZE)
		return fail(EPROTO);
	memcpy(&ret, reply, 4);
	if (ret == -ENOTTY)
		return fd;
	return fail(ret < 0 ? -ret : EPROTO);
}

/* The fd this process's call on fd goes through (fd's stripe is held). */
static int route(int fd)
{
	uint64_t entry = fd < CACHE_FDS ? __atomic_load_n(&verdicts[fd], __ATOMIC_RELAXED) : 0;
	uint64_t shared_ino = entry >> INODE_SHIFT;
	struct channel *ch;
	int chan;

	if (fd >= CACHE_FDS || (entry & OWN))
		return fd; /* this process got it from luod (or no room to track it) */
	ch = &channels[fd];
	chan = ch->fd_plus_1 - 1;
	if (chan >= 0 && ch->shared_ino == shared_ino && inode_of(chan) == ch->ino)
		return chan;
	if (chan >= 0)
		drop_channel(fd); /* the fd number now holds another socket */
	chan = bind_channel(fd);
	if (chan < 0)
		return -1;
	if (chan == fd) {
		/* A luod without channels: calls go to the fd, as in wire 1.0. */
		__atomic_store_n(&verdicts[fd], entry | OWN, __ATOMIC_RELAXED);
		return fd;
	}
	ch->shared_ino = shared_ino;
	ch->ino = inode_of(chan);
	ch->fd_plus_1 = chan + 1;
	return chan;
}

/* In a forked child: every fd is shared with the parent from now on. */
static void after_fork_in_child(void)
{
	int fd, top = __atomic_load_n(&highest_fd, __ATOMIC_RELAXED);

	for (fd = 0; fd < STRIPES; fd++)
		pthread_mutex_init(&stripes[fd], NULL); /* a parent's thread may hold one */
	for (fd = 0; fd <= top && fd < CACHE_FDS; fd++) {
		verdicts[fd] &= ~OWN;
		if (channels[fd].fd_plus_1)
			drop_channel(fd); /* our copy of the parent's channel */
	}
}

__attribute__((constructor)) static void shim_init(void)
{
	int i;

	for (i = 0; i < STRIPES; i++)
		pthread_mutex_init(&stripes[i], NULL);
	pthread_atfork(NULL, NULL, after_fork_in_child);
}

/* One ioctl on a luod fd: one request, one reply (wire.md), on this
 * process's route to the fd, taking turns with its other threads. */
static int luod_ioctl_on(int fd, unsigned int cmd, void *arg);

static int luod_ioctl(int fd, unsigned int cmd, void *arg)
{
	pthread_mutex_t *lock = stripe(fd);
	int path, ret, err;

	pthread_mutex_lock(lock);
	path = route(fd);
	ret = path < 0 ? -1 : luod_ioctl_on(path, cmd, arg);
	err = errno;
	pthread_mutex_unlock(lock);
	errno = err;
	return ret;
}

static int luod_ioctl_on(int fd, unsigned int cmd, void *arg)
{
	unsigned char *request, *reply;
	uint32_t size = 0, arg_len = 0, out_len;
	int32_t ret, caller_fd = -1;
	int attach = -1, spare = -1, got = -1, flags = 0, returns_fd, err;
	ssize_t n;

	/* No argument byte is read before luod said the number is valid: the
	 * bytes that can be read are sent, and luod's dispatch order decides
	 * between ENOTTY, EFAULT and the rest. */
	if (arg != NULL && copy_in(&size, arg, 4) == 0) {
		/* A number of another type, or with direction or size bits, is
		 * never a LUO call: only the size word goes (what the kernel would
		 * have read), and luod answers it as the device would. */
		arg_len = size < 4 || !luo_shaped(cmd) ? 4 : size;
		if (arg_len > MAX_ARG_LEN)
			return fail(E2BIG); /* wire.md's cap, as luod answers it */
	}
	request = malloc(HEADER_SIZE + (arg_len ? arg_len : 0));
	reply = malloc(HEADER_SIZE + (size_t)(arg_len ? arg_len : 4) + 1);
	if (request == NULL || reply == NULL) {
		free(request);
		free(reply);
		return fail(ENOMEM);
	}
	if (arg_len > 4 && copy_in(request + HEADER_SIZE, arg, arg_len) != 0)
		arg_len = 4; /* shorter than its size: luod answers EFAULT */
	if (arg_len == 4)
		memcpy(request + HEADER_SIZE, &size, 4);
	memcpy(request, &cmd, 4);
	memcpy(request + 4, &arg_len, 4);
	if (cmd == CMD_PRESERVE_FD && arg_len >= FD_OFFSET + 4) {
		memcpy(&caller_fd, request + HEADER_SIZE + FD_OFFSET, 4);
		attach = caller_fd >= 0 ? caller_fd : -1;
	}
	returns_fd = cmd == CMD_CREATE_SESSION || cmd == CMD_RETRIEVE_SESSION ||
		     cmd == CMD_RETRIEVE_FD || cmd == CMD_LIST_SESSIONS ||
		     cmd == CMD_REGISTER_PARTICIPANT;
	if (returns_fd) {
		/* Make sure the returned fd can be installed before asking: dropped
		 * on receipt, a retrieved session would be taken for closed (an
		 * implicit FINISH). The slot is freed right before receiving. */
		spare = dup(fd);
		if (spare < 0) {
			err = errno;
			goto out;
		}
	}
	if (send_request(fd, request, HEADER_SIZE + arg_len, attach) != 0) {
		err = peer_gone(errno) ? ENODEV : errno;
		goto out;
	}
	if (spare >= 0) {
		raw_close(spare);
		spare = -1;
	}
	n = recv_reply(fd, reply, HEADER_SIZE + (size_t)(arg_len ? arg_len : 4) + 1, &got, &flags);
	if (n < 0) {
		err = peer_gone(errno) ? ENODEV : errno;
		goto out;
	}
	if (n == 0) {
		err = ENODEV; /* luod closed its end: it rebooted or stopped */
		goto out;
	}
	if (flags & MSG_CTRUNC) {
		err = EMFILE;
		goto out;
	}
	if (flags & MSG_TRUNC || n < HEADER_SIZE) {
		err = EPROTO;
		goto out;
	}
	memcpy(&ret, reply, 4);
	memcpy(&out_len, reply + 4, 4);
	if (out_len != (uint32_t)(n - HEADER_SIZE) || (ret != 0 && out_len != 0) ||
	    out_len > arg_len || ret > 0) {
		err = EPROTO;
		goto out;
	}
	if (ret < 0) {
		err = -ret; /* nothing is written back on failure */
		goto out;
	}
	if (returns_fd) {
		if (got < 0) {
			err = EPROTO;
			goto out;
		}
		if (out_len >= FD_OFFSET + 4)
			memcpy(reply + HEADER_SIZE + FD_OFFSET, &got, 4);
	}
	if (copy_out(arg, reply + HEADER_SIZE, out_len) != 0) {
		err = EFAULT;
		goto out;
	}
	if (cmd == CMD_CREATE_SESSION || cmd == CMD_RETRIEVE_SESSION)
		remember(got, 1, 1);
	got = -1; /* the caller's now */
	err = 0;
out:
	if (spare >= 0)
		raw_close(spare);
	if (got >= 0)
		raw_close(got);
	free(request);
	free(reply);
	if (err)
		return fail(err);
	return 0;
}

/* An fd of a luod that went away: a SEQPACKET Unix socket whose peer hung
 * up. After exec a session fd's peer can no longer be named (its process is
 * gone), so this is what is left to recognise it by. Keeps errno. */
static int is_orphaned_socket(int fd)
{
	struct pollfd pfd = { fd, POLLRDHUP, 0 };
	int saved = errno, orphaned;

	orphaned = is_seqpacket_unix(fd) && poll(&pfd, 1, 0) == 1 &&
		   (pfd.revents & (POLLHUP | POLLRDHUP));
	errno = saved;
	return orphaned;
}

/* Generic fd ioctls that the VFS answers for any file, device or not. */
static int generic_fd_ioctl(unsigned long cmd)
{
	return cmd == FIOCLEX || cmd == FIONCLEX || cmd == FIONBIO || cmd == FIOASYNC;
}

int ioctl(int fd, unsigned long cmd, ...)
{
	static ioctl_fn real;
	va_list ap;
	void *arg;

	va_start(ap, cmd);
	arg = va_arg(ap, void *);
	va_end(ap);
	if (!generic_fd_ioctl(cmd)) {
		/* luod decides every answer, as the device does: ENOTTY for a
		 * number of another type, or Linux's EINVAL under --compat=linux. */
		if (is_luod_fd(fd))
			return luod_ioctl(fd, (unsigned int)cmd, arg);
		/* A LUO call on the fd of a luod that went away: ENODEV, as for
		 * the fd of an old generation, rather than a socket's ENOTTY. */
		if (luo_shaped((unsigned int)cmd) && is_orphaned_socket(fd))
			return fail(ENODEV);
	}
	if (!real)
		real = (ioctl_fn)next("ioctl");
	return real(fd, cmd, arg);
}

/* Closing a shared luod fd closes this process's channel to it too. */
int close(int fd)
{
	static int (*real)(int);
	pthread_mutex_t *lock;

	if (fd >= 0 && fd < CACHE_FDS && __atomic_load_n(&channels[fd].fd_plus_1, __ATOMIC_RELAXED)) {
		lock = stripe(fd);
		pthread_mutex_lock(lock);
		if (channels[fd].fd_plus_1)
			drop_channel(fd);
		pthread_mutex_unlock(lock);
	}
	if (!real)
		real = (int (*)(int))next("close");
	return real(fd);
}
