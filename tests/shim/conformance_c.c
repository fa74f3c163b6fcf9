/* SPDX-License-Identifier: GPL-2.0-only */
/*
 * conformance_c - the scenarios of conformance.md section C (two generations)
 * that a C program calling ioctl() can run, written against liveupdate/luo.h
 * only and linked to nothing of ours, in two stages around a reboot:
 *
 *   conformance_c stage1 PREFIX [--detach]
 *       creates and fills the sessions, closes the device and keeps the
 *       session fds open: it prints "stage1 holding" and waits for EOF on
 *       stdin (luod: the test runs `luoctl reboot` meanwhile), or, with
 *       --detach, hands the fds to a daemonized child that holds them until
 *       the kexec and exits 0 (the kernel VM: a process that exits closes its
 *       sessions, which unpreserves them).
 *   conformance_c stage2 PREFIX
 *       retrieves, checks and finishes them.
 *
 * Both print one line per check, "<id> <step> <OK, errno name or MISMATCH>",
 * always the same lines in the same order, like conformance.c; the lines of
 * luod (under LD_PRELOAD=libluoshim.so) and of a LUO kernel are compared by
 * tests/shim/test_conformance_c_reboot.py.
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
#include <sys/stat.h>
#include <unistd.h>

#include "conformance.h"

#define C4_FILES 500
#define C5_BYTES (1 << 20)
#define C7_SIZE 4096

static void die(const char *what)
{
	perror(what);
	exit(2);
}

static int open_device(void)
{
	int fd = open(DEVICE, O_RDWR | O_CLOEXEC);

	if (fd < 0) {
		line("C", "open", errno);
		exit(1);
	}
	return fd;
}

static int retrieve(int dev, const char *suffix, int *out)
{
	return session_call(dev, LIVEUPDATE_IOCTL_RETRIEVE_SESSION, suffix, out);
}

static int retrieve_fd(int s, __u64 token, int *out)
{
	struct liveupdate_session_retrieve_fd rf = { .size = sizeof(rf), .fd = -1, .token = token };
	int err = call(s, LIVEUPDATE_SESSION_RETRIEVE_FD, &rf);

	*out = err ? -1 : rf.fd;
	return err;
}

static int finish(int s)
{
	struct liveupdate_session_finish fin = { .size = sizeof(fin) };

	return call(s, LIVEUPDATE_SESSION_FINISH, &fin);
}

static int memfd_with(const void *data, size_t len)
{
	int fd = memfd_create("conformance_c", MFD_CLOEXEC);
	const char *p = data;

	if (fd < 0)
		die("memfd_create");
	while (len > 0) {
		ssize_t n = write(fd, p, len);

		if (n <= 0)
			die("write");
		p += n;
		len -= n;
	}
	return fd;
}

static int memfd(const char *data)
{
	return memfd_with(data, strlen(data));
}

/* The file holds exactly len bytes equal to data. */
static int holds_bytes(int fd, const void *data, size_t len)
{
	static unsigned char got[C5_BYTES + 1];
	size_t have = 0;
	ssize_t n;

	if (fd < 0)
		return 0;
	while ((n = pread(fd, got + have, sizeof(got) - have, have)) > 0)
		have += n;
	return n == 0 && have == len && memcmp(got, data, len) == 0;
}

static int holds(int fd, const char *data)
{
	return holds_bytes(fd, data, strlen(data));
}

/* C5's 1 MiB: the same pseudo-random bytes in both stages (xorshift64). */
static unsigned char *c5_bytes(void)
{
	static unsigned char buf[C5_BYTES];
	__u64 x = 0x9E3779B97F4A7C15ULL;
	size_t i;

	for (i = 0; i < sizeof(buf); i++) {
		x ^= x << 13;
		x ^= x >> 7;
		x ^= x << 17;
		buf[i] = (unsigned char)(x >> 32);
	}
	return buf;
}

static const char C7_DATA[] = "written after preserving";

/* -- stage 1 ---------------------------------------------------------------- */

/* Session fds stage 1 keeps open across the reboot. */
static int kept[16];
static int n_kept;

static int keep(int fd)
{
	kept[n_kept++] = fd;
	return fd;
}

/* Create "suffix" and keep it; 0 or the errno, printed as "<id> create-<suffix>". */
static int create_kept(int dev, const char *id, const char *suffix, int *out)
{
	char step[64];
	int err = create(dev, suffix, out);

	snprintf(step, sizeof(step), "create-%s", suffix);
	line(id, step, err);
	if (!err)
		keep(*out);
	return err;
}

/* Preserve a new memfd holding data under token, then close the caller's copy. */
static void preserve_data(const char *id, const char *step, int s, const char *data, __u64 token)
{
	int fd = memfd(data);

	line(id, step, preserve(s, fd, token));
	close(fd);
}

static void stage1(int detach)
{
	int dev = open_device(), s, fd, err, i;
	char data[32];

	/* C1 */
	create_kept(dev, "C1", "c1", &s);
	preserve_data("C1", "preserve-0x1a", s, "hello kexec world", 0x1A);

	/* C2 */
	create_kept(dev, "C2", "c2-empty-1", &s);
	create_kept(dev, "C2", "c2-empty-2", &s);
	create_kept(dev, "C2", "c2-one", &s);
	preserve_data("C2", "preserve-0x1001", s, "c2 file 0x1001", 0x1001);
	create_kept(dev, "C2", "c2-two", &s);
	preserve_data("C2", "preserve-0x2002", s, "c2 file 0x2002", 0x2002);
	preserve_data("C2", "preserve-0x3003", s, "c2 file 0x3003", 0x3003);

	skip("C3", "slow");

	/* C4 */
	create_kept(dev, "C4", "c4", &s);
	err = 0;
	for (i = 0; i < C4_FILES; i++) {
		snprintf(data, sizeof(data), "file-data-%d", i);
		fd = memfd(data);
		if (!err)
			err = preserve(s, fd, i);
		close(fd);
	}
	line("C4", "preserve-500", err);

	/* C5 */
	create_kept(dev, "C5", "c5", &s);
	fd = memfd_with(c5_bytes(), C5_BYTES);
	line("C5", "preserve-1mib", preserve(s, fd, 0x5));
	close(fd);

	/* C6 */
	create_kept(dev, "C6", "c6", &s);
	preserve_data("C6", "preserve-empty", s, "", 0x6);

	/* C7: the data comes after the preserve */
	create_kept(dev, "C7", "c7", &s);
	fd = memfd("");
	if (ftruncate(fd, C7_SIZE) < 0)
		die("ftruncate");
	line("C7", "preserve-sized", preserve(s, fd, 0x7));
	verdict("C7", "write-after-preserve",
		pwrite(fd, C7_DATA, sizeof(C7_DATA) - 1, 0) == sizeof(C7_DATA) - 1);
	close(fd);

	/* C8: a session closed before the reboot */
	line("C8", "create-c8", create(dev, "c8", &s));
	preserve_data("C8", "preserve-0x8", s, "gone", 0x8);
	line("C8", "close-session", close(s) < 0 ? errno : 0);

	/* C9-C15, C21 */
	create_kept(dev, "C9", "c9", &s);
	create_kept(dev, "C10", "c10", &s);
	preserve_data("C10", "preserve-0x10", s, "0123456789", 0x10);
	create_kept(dev, "C12", "c12", &s);
	preserve_data("C12", "preserve-0x12", s, "kept after finish", 0x12);
	create_kept(dev, "C15", "c15", &s);
	create_kept(dev, "C21", "c21", &s);
	preserve_data("C21", "preserve-0x21", s, "handed on", 0x21);

	line("C1", "close-device", close(dev) < 0 ? errno : 0);

	if (detach) {
		pid_t pid = fork();

		if (pid < 0)
			die("fork");
		if (pid == 0) {
			/* The holder: keeps the session fds until the kexec ends it. */
			int null = open("/dev/null", O_RDWR);

			setsid();
			dup2(null, 0);
			dup2(null, 1);
			dup2(null, 2);
			for (;;)
				pause();
		}
		printf("stage1 holding\n");
		return;
	}
	printf("stage1 holding\n");
	fflush(stdout);
	while (read(0, data, sizeof(data)) > 0)
		;
	for (i = 0; i < n_kept; i++)
		close(kept[i]);
}

/* -- stage 2 ---------------------------------------------------------------- */

/* RETRIEVE_SESSION "suffix", printed as "<id> retrieve-<suffix>"; -1 if it failed. */
static int retrieve_line(int dev, const char *id, const char *suffix)
{
	char step[64];
	int s;

	snprintf(step, sizeof(step), "retrieve-%s", suffix);
	line(id, step, retrieve(dev, suffix, &s));
	return s;
}

/* RETRIEVE_FD token and check its content; the fd is closed. */
static void retrieve_data(const char *id, const char *step, int s, __u64 token, const char *data)
{
	char name[64];
	int fd;

	snprintf(name, sizeof(name), "retrieve-%s", step);
	line(id, name, retrieve_fd(s, token, &fd));
	snprintf(name, sizeof(name), "data-%s", step);
	verdict(id, name, holds(fd, data));
	if (fd >= 0)
		close(fd);
}

static void finish_line(const char *id, const char *suffix, int s)
{
	char step[64];

	snprintf(step, sizeof(step), "finish-%s", suffix);
	line(id, step, s < 0 ? EBADF : finish(s));
	if (s >= 0)
		close(s);
}

static void stage2(void)
{
	int dev = open_device(), s, s2, fd, fd2, err, ok, i;
	char data[32];
	struct stat st;

	/* C1, and C11, C14 on its incoming session */
	s = retrieve_line(dev, "C1", "c1");
	retrieve_data("C1", "0x1a", s, 0x1A, "hello kexec world");
	line("C11", "retrieve-unknown-token", retrieve_fd(s, 0xC11, &fd));
	fd = memfd("not for an incoming session");
	line("C14", "preserve-on-incoming", preserve(s, fd, 0xC14));
	close(fd);
	finish_line("C1", "c1", s);

	/* C2 */
	finish_line("C2", "c2-empty-1", retrieve_line(dev, "C2", "c2-empty-1"));
	finish_line("C2", "c2-empty-2", retrieve_line(dev, "C2", "c2-empty-2"));
	s = retrieve_line(dev, "C2", "c2-one");
	retrieve_data("C2", "0x1001", s, 0x1001, "c2 file 0x1001");
	finish_line("C2", "c2-one", s);
	s = retrieve_line(dev, "C2", "c2-two");
	retrieve_data("C2", "0x2002", s, 0x2002, "c2 file 0x2002");
	retrieve_data("C2", "0x3003", s, 0x3003, "c2 file 0x3003");
	finish_line("C2", "c2-two", s);

	skip("C3", "slow");

	/* C4 */
	s = retrieve_line(dev, "C4", "c4");
	err = 0;
	ok = 1;
	for (i = 0; i < C4_FILES; i++) {
		snprintf(data, sizeof(data), "file-data-%d", i);
		if (!err)
			err = retrieve_fd(s, i, &fd);
		ok = ok && !err && holds(fd, data);
		if (!err)
			close(fd);
	}
	line("C4", "retrieve-500", err);
	verdict("C4", "data-500", ok);
	finish_line("C4", "c4", s);

	/* C5 */
	s = retrieve_line(dev, "C5", "c5");
	line("C5", "retrieve-1mib", retrieve_fd(s, 0x5, &fd));
	verdict("C5", "byte-exact", holds_bytes(fd, c5_bytes(), C5_BYTES));
	if (fd >= 0)
		close(fd);
	finish_line("C5", "c5", s);

	/* C6 */
	s = retrieve_line(dev, "C6", "c6");
	line("C6", "retrieve-empty", retrieve_fd(s, 0x6, &fd));
	verdict("C6", "size-0", fd >= 0 && fstat(fd, &st) == 0 && st.st_size == 0);
	if (fd >= 0)
		close(fd);
	finish_line("C6", "c6", s);

	/* C7 */
	s = retrieve_line(dev, "C7", "c7");
	line("C7", "retrieve-sized", retrieve_fd(s, 0x7, &fd));
	{
		char got[sizeof(C7_DATA)] = "";

		ok = fd >= 0 && fstat(fd, &st) == 0 && st.st_size == C7_SIZE;
		ok = ok && pread(fd, got, sizeof(C7_DATA) - 1, 0) == sizeof(C7_DATA) - 1;
		verdict("C7", "data-written-after-preserve", ok && strcmp(got, C7_DATA) == 0);
	}
	if (fd >= 0)
		close(fd);
	finish_line("C7", "c7", s);

	/* C8, and a name that never existed */
	line("C8", "retrieve-closed-session", retrieve(dev, "c8", &s));
	line("C8", "retrieve-unknown-session", retrieve(dev, "never-created", &s));

	/* C9 */
	s = retrieve_line(dev, "C9", "c9");
	line("C9", "retrieve-again", retrieve(dev, "c9", &s2));
	if (s2 >= 0)
		close(s2);
	finish_line("C9", "c9", s);

	/* C10: the same open file twice (one file position) */
	s = retrieve_line(dev, "C10", "c10");
	line("C10", "retrieve-fd-first", retrieve_fd(s, 0x10, &fd));
	line("C10", "retrieve-fd-second", retrieve_fd(s, 0x10, &fd2));
	ok = fd >= 0 && fd2 >= 0 && lseek(fd, 0, SEEK_SET) == 0 && read(fd, data, 4) == 4;
	verdict("C10", "shared-position", ok && lseek(fd2, 0, SEEK_CUR) == 4);
	if (fd >= 0)
		close(fd);
	if (fd2 >= 0)
		close(fd2);
	finish_line("C10", "c10", s);

	/* C12, C13 */
	s = retrieve_line(dev, "C12", "c12");
	line("C13", "retrieve-fd", retrieve_fd(s, 0x12, &fd));
	line("C12", "finish-first", finish(s));
	line("C12", "finish-second", finish(s));
	line("C12", "retrieve-fd-after-finish", retrieve_fd(s, 0x12, &fd2));
	if (fd2 >= 0)
		close(fd2);
	verdict("C13", "fd-valid-after-finish", holds(fd, "kept after finish"));
	if (fd >= 0)
		close(fd);
	close(s);

	/* C15: an outgoing session named like an incoming one */
	line("C15", "create-named-like-incoming", create(dev, "c15", &s2));
	if (s2 >= 0)
		close(s2);
	finish_line("C15", "c15", retrieve_line(dev, "C15", "c15"));

	skip("C16", "needs-third-generation");
	skip("C17", "luod-only");
	skip("C18", "daemon-side");
	skip("C19", "daemon-side");
	skip("C20", "daemon-side");

	/* C21 */
	s = retrieve_line(dev, "C21", "c21");
	line("C21", "retrieve-fd", retrieve_fd(s, 0x21, &fd));
	line("C21", "create-outgoing", create(dev, "c21-out", &s2));
	line("C21", "preserve-before-finish", preserve(s2, fd, 0x21));
	line("C21", "finish", finish(s));
	line("C21", "preserve-after-finish", preserve(s2, fd, 0x21));
	close(s);
	if (fd >= 0)
		close(fd);
	if (s2 >= 0)
		close(s2);

	close(dev);
}

int main(int argc, char **argv)
{
	struct rlimit rl;
	int detach = argc == 4 && strcmp(argv[3], "--detach") == 0;

	if ((argc != 3 && !detach) || strlen(argv[2]) > 40 ||
	    (strcmp(argv[1], "stage1") != 0 && strcmp(argv[1], "stage2") != 0)) {
		fprintf(stderr, "usage: %s stage1|stage2 PREFIX [--detach] (PREFIX <= 40 bytes)\n",
			argv[0]);
		return 2;
	}
	prefix = argv[2];
	if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < 2048 && rl.rlim_max >= 2048) {
		rl.rlim_cur = 2048;
		setrlimit(RLIMIT_NOFILE, &rl);
	}
	if (strcmp(argv[1], "stage1") == 0)
		stage1(detach);
	else
		stage2();
	return 0;
}
