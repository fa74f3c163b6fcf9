/* SPDX-License-Identifier: GPL-2.0-only */
/*
 * conformance - the scenarios of conformance.md sections A and B that a C
 * program calling ioctl() can run, written against liveupdate/luo.h only and
 * linked to nothing of ours. It opens "/dev/liveupdate" (luod's socket under
 * LD_PRELOAD=libluoshim.so, a kernel's device without it) and prints one line
 * per check, "<id> <step> <OK or errno name>", always the same lines in the
 * same order. tests/shim/test_conformance_c.py runs the same checks through
 * the Python library and compares the two outputs line by line.
 *
 * Usage: conformance PREFIX   (PREFIX starts every session name)
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include "conformance.h"

#define B13_FILES 500

static int open_device(void)
{
	int fd = open(DEVICE, O_RDWR | O_CLOEXEC);

	return fd < 0 ? -errno : fd;
}

static int memfd(const char *data)
{
	int fd = memfd_create("conformance", MFD_CLOEXEC);

	if (fd < 0 || write(fd, data, strlen(data)) != (ssize_t)strlen(data)) {
		perror("memfd");
		exit(2);
	}
	return fd;
}

static int holds(int fd, const char *data)
{
	char got[256];
	ssize_t n = pread(fd, got, sizeof(got), 0);

	return n == (ssize_t)strlen(data) && memcmp(got, data, n) == 0;
}

/* Another process opens the device: 0 or its errno. */
static int open_elsewhere(void)
{
	pid_t pid = fork();
	int status;

	if (pid == 0) {
		int fd = open_device();

		_exit(fd < 0 ? -fd : 0);
	}
	if (pid < 0 || waitpid(pid, &status, 0) != pid || !WIFEXITED(status))
		exit(2);
	return WEXITSTATUS(status);
}

/* -- the six upstream ioctls, as raw structs (A8-A10, A15) ------------------ */

struct ioctl_info {
	const char *name;
	unsigned long cmd;
	unsigned int sizeof_;
	int on_session;
	int fd_out;
};

static const struct ioctl_info IOCTLS[] = {
	{ "create_session", LIVEUPDATE_IOCTL_CREATE_SESSION,
	  sizeof(struct liveupdate_ioctl_create_session), 0, 1 },
	{ "retrieve_session", LIVEUPDATE_IOCTL_RETRIEVE_SESSION,
	  sizeof(struct liveupdate_ioctl_retrieve_session), 0, 1 },
	{ "preserve_fd", LIVEUPDATE_SESSION_PRESERVE_FD,
	  sizeof(struct liveupdate_session_preserve_fd), 1, 0 },
	{ "retrieve_fd", LIVEUPDATE_SESSION_RETRIEVE_FD,
	  sizeof(struct liveupdate_session_retrieve_fd), 1, 1 },
	{ "finish", LIVEUPDATE_SESSION_FINISH, sizeof(struct liveupdate_session_finish), 1, 0 },
	{ "get_name", LIVEUPDATE_SESSION_GET_NAME, sizeof(struct liveupdate_session_get_name), 1,
	  0 },
};

#define N_IOCTLS (sizeof(IOCTLS) / sizeof(IOCTLS[0]))

union arg {
	unsigned char b[128];
	__u64 align;
};

/*
 * Issue IOCTLS[i] with valid, fresh fields (so that only `size` and the tail
 * decide), `size` declared, and one non-zero byte at `tail` when >= 0: the
 * errno, with a returned fd closed.
 */
static int raw_call(int dev, int session, size_t i, unsigned int size, int tail, int tag)
{
	const struct ioctl_info *info = &IOCTLS[i];
	union arg a;
	int memfd_fd = -1;
	__s32 fd = -1;
	int err;

	memset(&a, 0, sizeof(a));
	memcpy(a.b, &size, 4);
	if (i <= 1) {
		char suffix[32];

		snprintf(suffix, sizeof(suffix), i == 0 ? "t%d" : "absent", tag);
		memcpy(a.b + 4, &fd, 4);
		session_name((char *)a.b + 8, suffix);
	} else if (i <= 3) {
		__u64 token = i == 2 ? 0xA000 + tag : 1;

		if (i == 2)
			fd = memfd_fd = memfd("a memfd");
		memcpy(a.b + 4, &fd, 4);
		memcpy(a.b + 8, &token, 8);
	}
	if (tail >= 0)
		a.b[tail] = 0x5A;
	err = call(info->on_session ? session : dev, info->cmd, &a);
	if (err == 0 && info->fd_out) {
		memcpy(&fd, a.b + 4, 4);
		close(fd);
	}
	if (memfd_fd >= 0)
		close(memfd_fd);
	return err;
}

/* -- section A ---------------------------------------------------------------- */

static void section_a(void)
{
	char step[64], name63[LIVEUPDATE_SESSION_NAME_LENGTH];
	int dev, s, a, b, err;
	size_t i;

	/* A1 */
	dev = open_device();
	line("A1", "open", dev < 0 ? -dev : 0);
	line("A1", "close", close(dev) < 0 ? errno : 0);

	/* A2 */
	dev = open_device();
	line("A2", "open", dev < 0 ? -dev : 0);
	err = open_device();
	line("A2", "open-same-process", err < 0 ? -err : (close(err), 0));
	line("A2", "open-other-process", open_elsewhere());
	close(dev);
	dev = open_device();
	line("A2", "open-after-close", dev < 0 ? -dev : 0);
	if (dev < 0)
		exit(1);

	line("A3", "create-s", create(dev, "s", &s));
	if (s < 0)
		exit(1);

	/* A3 */
	line("A3", "create-x", create(dev, "x", &a));
	line("A3", "create-x-again", create(dev, "x", &b));
	close(a);

	/* A4 */
	line("A4", "create-a", create(dev, "a", &a));
	line("A4", "create-b", create(dev, "b", &b));
	close(a);
	close(b);

	/* A5 */
	{
		struct liveupdate_ioctl_create_session cs = { .size = sizeof(cs), .fd = -1 };

		line("A5", "empty-name", call(dev, LIVEUPDATE_IOCTL_CREATE_SESSION, &cs));
		memset(cs.name, 'n', sizeof(cs.name));
		line("A5", "64-bytes-no-nul", call(dev, LIVEUPDATE_IOCTL_CREATE_SESSION, &cs));
	}

	/* A6 */
	{
		struct liveupdate_ioctl_create_session cs = { .size = sizeof(cs), .fd = -1 };
		struct liveupdate_session_get_name gn = { .size = sizeof(gn) };

		memset(name63, '6', sizeof(name63));
		name63[sizeof(name63) - 1] = 0;
		memcpy(name63, prefix, strlen(prefix));
		name63[strlen(prefix)] = '-';
		memcpy(cs.name, name63, sizeof(cs.name));
		line("A6", "create-63", call(dev, LIVEUPDATE_IOCTL_CREATE_SESSION, &cs));
		memset(gn.name, 0xFF, sizeof(gn.name));
		line("A6", "get-name", call(cs.fd, LIVEUPDATE_SESSION_GET_NAME, &gn));
		verdict("A6", "same-63-bytes", memcmp(gn.name, name63, sizeof(name63)) == 0);
		close(cs.fd);
	}

	/* A7: a zeroed 72-byte struct, so an accepted number would be EINVAL */
	{
		static const struct {
			const char *step;
			int on_session;
			unsigned long cmd;
		} cases[] = {
			{ "device-nr-02", 0, 0xBA02 },
			{ "device-nr-7f", 0, 0xBA7F },
			{ "device-session-nr-40", 0, 0xBA40 },
			{ "device-session-nr-43", 0, 0xBA43 },
			{ "session-device-nr-00", 1, 0xBA00 },
			{ "session-device-nr-01", 1, 0xBA01 },
			{ "session-nr-44", 1, 0xBA44 },
			{ "device-type-bb", 0, 0xBB00 },
			{ "session-type-bb", 1, 0xBB40 },
			{ "device-iowr-bits", 0, _IOC(_IOC_READ | _IOC_WRITE, 0xBA, 0x00, 72) },
			{ "session-iowr-bits", 1, _IOC(_IOC_READ | _IOC_WRITE, 0xBA, 0x40, 16) },
			{ "session-size-bits", 1, 0x0048BA43 },
		};

		for (i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
			union arg arg;

			memset(&arg, 0, sizeof(arg));
			arg.b[0] = 72;
			line("A7", cases[i].step,
			     call(cases[i].on_session ? s : dev, cases[i].cmd, &arg));
		}
	}

	/* A8, A9, A10 */
	for (i = 0; i < N_IOCTLS; i++) {
		unsigned int sz = IOCTLS[i].sizeof_;

		snprintf(step, sizeof(step), "%s-size-min-1", IOCTLS[i].name);
		line("A8", step, raw_call(dev, s, i, sz - 1, -1, 10));
		snprintf(step, sizeof(step), "%s-size-0", IOCTLS[i].name);
		line("A8", step, raw_call(dev, s, i, 0, -1, 11));
		snprintf(step, sizeof(step), "%s-sizeof", IOCTLS[i].name);
		line("A9", step, raw_call(dev, s, i, sz, -1, 12));
		snprintf(step, sizeof(step), "%s-sizeof+8", IOCTLS[i].name);
		line("A9", step, raw_call(dev, s, i, sz + 8, -1, 13));
		snprintf(step, sizeof(step), "%s-tail-first", IOCTLS[i].name);
		line("A10", step, raw_call(dev, s, i, sz + 8, sz, 14));
		snprintf(step, sizeof(step), "%s-tail-last", IOCTLS[i].name);
		line("A10", step, raw_call(dev, s, i, sz + 8, sz + 7, 15));
	}

	skip("A11", "wire-only");
	skip("A12", "wire-only");

	/* A13 */
	{
		struct liveupdate_session_get_name gn = { .size = sizeof(gn), .reserved = 1 };
		struct liveupdate_session_finish fin = { .size = sizeof(fin), .reserved = 1 };

		line("A13", "get-name-reserved-1", call(s, LIVEUPDATE_SESSION_GET_NAME, &gn));
		gn.reserved = 0;
		line("A13", "get-name-reserved-0", call(s, LIVEUPDATE_SESSION_GET_NAME, &gn));
		line("A13", "finish-reserved-1", call(s, LIVEUPDATE_SESSION_FINISH, &fin));
	}

	skip("A14", "wire-only");

	/* A15: bytes past `size` are never written; the reply fills min(size, sizeof) */
	for (i = 0; i < N_IOCTLS; i++) {
		unsigned int extra;

		if (i != 0 && i != 2 && i != 5)
			continue;
		for (extra = 0; extra <= 8; extra += 8) {
			unsigned int size = IOCTLS[i].sizeof_ + extra;
			union arg arg;
			int fd = -1, ok;
			__u64 token = 0xF000 + extra;

			memset(&arg, 0, sizeof(arg));
			memcpy(arg.b, &size, 4);
			memset(arg.b + size, 0xEE, 8);
			if (i == 0) {
				snprintf(step, sizeof(step), "r%u", extra);
				session_name((char *)arg.b + 8, step);
			} else if (i == 2) {
				fd = memfd("a15");
				memcpy(arg.b + 4, &fd, 4);
				memcpy(arg.b + 8, &token, 8);
			}
			snprintf(step, sizeof(step), "%s-sizeof+%u", IOCTLS[i].name, extra);
			line("A15", step, call(i == 0 ? dev : s, IOCTLS[i].cmd, &arg));
			ok = arg.b[size] == 0xEE && arg.b[size + 7] == 0xEE &&
			     memcmp(arg.b, &size, 4) == 0;
			for (unsigned int k = IOCTLS[i].sizeof_; k < size; k++)
				ok = ok && arg.b[k] == 0;
			if (i == 5) {
				char want[LIVEUPDATE_SESSION_NAME_LENGTH] = { 0 };

				session_name(want, "s");
				ok = ok && memcmp(arg.b + 8, want, sizeof(want)) == 0;
			}
			snprintf(step, sizeof(step), "%s-sizeof+%u-reply", IOCTLS[i].name, extra);
			verdict("A15", step, ok);
			if (i == 0) {
				memcpy(&fd, arg.b + 4, 4);
				close(fd);
			} else if (fd >= 0) {
				close(fd);
			}
		}
	}

	skip("A16", "covered-by-python");
	skip("A17", "wire-only");
	close(s);
	close(dev);
}

/* -- section B ---------------------------------------------------------------- */

static void section_b(void)
{
	int dev = open_device(), s1, s2, a, b, fd, err;
	static int files[B13_FILES];
	char data[32];
	int i;

	if (dev < 0) {
		line("B", "open", -dev);
		exit(1);
	}

	/* B1 */
	line("B1", "create", create(dev, "b1", &s1));
	a = memfd("hello liveupdate");
	line("B1", "preserve-0x1234", preserve(s1, a, 0x1234));
	verdict("B1", "data-while-preserved", holds(a, "hello liveupdate"));
	line("B1", "close-session", close(s1) < 0 ? errno : 0);
	verdict("B1", "data-after-close", holds(a, "hello liveupdate"));
	close(a);

	/* B2 */
	create(dev, "b2", &s1);
	a = memfd("first file");
	b = memfd("second file");
	line("B2", "preserve-0xaaaa", preserve(s1, a, 0xAAAA));
	line("B2", "preserve-0xbbbb", preserve(s1, b, 0xBBBB));
	close(s1);
	verdict("B2", "data", holds(a, "first file") && holds(b, "second file"));
	close(a);
	close(b);

	/* B3 */
	create(dev, "b3-one", &s1);
	create(dev, "b3-two", &s2);
	a = memfd("session one data");
	b = memfd("session two data");
	line("B3", "preserve-s1-data", preserve(s1, a, 0x10));
	fd = memfd("");
	line("B3", "preserve-s1-empty", preserve(s1, fd, 0x11));
	close(fd);
	line("B3", "preserve-s2-data", preserve(s2, b, 0x20));
	fd = memfd("");
	line("B3", "preserve-s2-empty", preserve(s2, fd, 0x21));
	close(fd);
	close(a);
	close(b);
	close(s1);
	close(s2);

	/* B4 */
	create(dev, "b4", &s1);
	fd = open("/dev/null", O_RDWR | O_CLOEXEC);
	line("B4", "preserve-dev-null", preserve(s1, fd, 0xDEAD));
	close(fd);
	close(s1);

	/* B5 */
	create(dev, "b5-one", &s1);
	create(dev, "b5-two", &s2);
	a = memfd("only once");
	line("B5", "preserve-s1-0x1111", preserve(s1, a, 0x1111));
	line("B5", "preserve-s2-0x2222", preserve(s2, a, 0x2222));
	line("B5", "preserve-s1-0x3333", preserve(s1, a, 0x3333));
	close(a);
	close(s1);
	close(s2);

	/* B6 */
	create(dev, "b6", &s1);
	a = memfd("a");
	b = memfd("b");
	line("B6", "preserve-a-0x66", preserve(s1, a, 0x66));
	line("B6", "preserve-b-0x66", preserve(s1, b, 0x66));
	close(a);
	close(b);
	close(s1);

	/* B7 */
	create(dev, "b7-one", &s1);
	create(dev, "b7-two", &s2);
	a = memfd("1");
	b = memfd("2");
	line("B7", "preserve-s1-0x77", preserve(s1, a, 0x77));
	line("B7", "preserve-s2-0x77", preserve(s2, b, 0x77));
	close(a);
	close(b);
	close(s1);
	close(s2);

	/* B8 */
	create(dev, "b8", &s1);
	a = memfd("zero");
	b = memfd("max");
	line("B8", "preserve-token-0", preserve(s1, a, 0));
	line("B8", "preserve-token-max", preserve(s1, b, ~(__u64)0));
	close(a);
	close(b);
	close(s1);

	/* B9: the file outlives the caller's fd (the reboot half is section C) */
	create(dev, "b9", &s1);
	a = memfd("still here");
	line("B9", "preserve", preserve(s1, a, 0xB9));
	line("B9", "close-own-fd", close(a) < 0 ? errno : 0);
	a = memfd("another");
	line("B9", "preserve-again-0xb9", preserve(s1, a, 0xB9));
	close(a);
	close(s1);

	/* B10 */
	create(dev, "b10", &s1);
	{
		struct liveupdate_session_retrieve_fd rf = { .size = sizeof(rf), .fd = -1, .token = 1 };
		struct liveupdate_session_finish fin = { .size = sizeof(fin) };

		a = memfd("x");
		preserve(s1, a, 1);
		close(a);
		line("B10", "retrieve-fd", call(s1, LIVEUPDATE_SESSION_RETRIEVE_FD, &rf));
		line("B10", "finish", call(s1, LIVEUPDATE_SESSION_FINISH, &fin));
	}
	close(s1);

	skip("B11", "needs-max-files");
	skip("B12", "slow");

	/* B13 */
	create(dev, "b13", &s1);
	err = 0;
	for (i = 0; i < B13_FILES; i++) {
		snprintf(data, sizeof(data), "file-data-%d", i);
		files[i] = memfd(data);
		if (!err)
			err = preserve(s1, files[i], i);
	}
	line("B13", "preserve-500", err);
	close(s1);
	err = 1;
	for (i = 0; i < B13_FILES; i++) {
		snprintf(data, sizeof(data), "file-data-%d", i);
		err = err && holds(files[i], data);
		close(files[i]);
	}
	verdict("B13", "data", err);

	/* B14 */
	create(dev, "b14", &s1);
	a = memfd("reachable by O_PATH");
	snprintf(data, sizeof(data), "/proc/self/fd/%d", a);
	fd = open(data, O_PATH | O_CLOEXEC);
	line("B14", "preserve-o-path", preserve(s1, fd, 0x14));
	line("B14", "preserve-memfd", preserve(s1, a, 0x14));
	close(fd);
	close(a);
	close(s1);

	/* B15 */
	{
		int p[2];

		create(dev, "b15", &s1);
		if (pipe2(p, O_CLOEXEC) < 0)
			exit(2);
		line("B15", "preserve-read-end", preserve(s1, p[0], 0x150));
		line("B15", "preserve-write-end", preserve(s1, p[1], 0x151));
		line("B15", "preserve-read-end-again", preserve(s1, p[0], 0x152));
		close(p[0]);
		close(p[1]);
		close(s1);
	}
	close(dev);
}

int main(int argc, char **argv)
{
	struct rlimit rl;

	if (argc != 2 || strlen(argv[1]) > 40) {
		fprintf(stderr, "usage: %s PREFIX (at most 40 bytes)\n", argv[0]);
		return 2;
	}
	prefix = argv[1];
	/* B13 holds 500 memfds at once. */
	if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < 2048 && rl.rlim_max >= 2048) {
		rl.rlim_cur = 2048;
		setrlimit(RLIMIT_NOFILE, &rl);
	}
	section_a();
	section_b();
	return 0;
}
