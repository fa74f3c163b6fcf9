/* SPDX-License-Identifier: GPL-2.0-only */
/*
 * shimprobe - the shim's behaviours, one subcommand each, run under
 * LD_PRELOAD=libluoshim.so by tests/shim/test_shim.py. Each prints what a
 * program would see ("name: ok" or "name: ERRNO-NAME"), one line per step.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <liveupdate/luo.h>

static void report(const char *step, int rc)
{
	printf("%s: %s\n", step, rc < 0 ? strerrorname_np(errno) : "ok");
	fflush(stdout);
}

static int open_device(void)
{
	int fd = open("/dev/liveupdate", O_RDWR | O_CLOEXEC);

	report("open", fd);
	if (fd < 0)
		exit(1);
	return fd;
}

static int create(int dev, const char *name)
{
	struct liveupdate_ioctl_create_session cs = { .size = sizeof(cs), .fd = -7 };
	int rc;

	strncpy((char *)cs.name, name, sizeof(cs.name) - 1);
	rc = ioctl(dev, LIVEUPDATE_IOCTL_CREATE_SESSION, &cs);
	report("create", rc);
	return rc < 0 ? -1 : cs.fd;
}

static void get_name(int fd)
{
	struct liveupdate_session_get_name gn = { .size = sizeof(gn) };
	int rc = ioctl(fd, LIVEUPDATE_SESSION_GET_NAME, &gn);

	if (rc < 0)
		report("get_name", rc);
	else
		printf("get_name: %s\n", (char *)gn.name);
	fflush(stdout);
}

static void wait_stdin(void)
{
	char line[16];

	printf("ready\n");
	fflush(stdout);
	while (fgets(line, sizeof(line), stdin))
		;
}

/* Open the device, create session NEXT, and exec this program as
 * "NEXT SESSION-FD DEVICE-FD": it inherits both fds and nothing else. */
static int exec_with_fds(const char *self, const char *next)
{
	char num[16], devnum[16];
	int dev = open_device(), ses = create(dev, next);

	/* Both are close-on-exec (open asked for it; session fds are, like the
	 * kernel's): the program lets them through. */
	fcntl(ses, F_SETFD, 0);
	fcntl(dev, F_SETFD, 0);
	snprintf(num, sizeof(num), "%d", ses);
	snprintf(devnum, sizeof(devnum), "%d", dev);
	execl("/proc/self/exe", self, next, num, devnum, (char *)NULL);
	return 127;
}

int main(int argc, char **argv)
{
	const char *cmd = argc > 1 ? argv[1] : "";
	int dev, ses, fd, n, pid, status;

	if (strcmp(cmd, "errors") == 0) {
		struct liveupdate_ioctl_create_session cs = { .size = 0 };
		struct liveupdate_session_finish fin = { .size = sizeof(fin) };

		dev = open_device();
		report("second_open", open("/dev/liveupdate", O_RDWR));
		report("null_arg", ioctl(dev, LIVEUPDATE_IOCTL_CREATE_SESSION, NULL));
		report("bad_pointer", ioctl(dev, LIVEUPDATE_IOCTL_CREATE_SESSION, (void *)8));
		report("null_arg_unknown_nr", ioctl(dev, _IO(LIVEUPDATE_IOCTL_TYPE, 0x7F), NULL));
		report("size_zero", ioctl(dev, LIVEUPDATE_IOCTL_CREATE_SESSION, &cs));
		report("wrong_type", ioctl(dev, _IO(0xBB, 0), &cs));
		report("direction_bits", ioctl(dev, _IOW(LIVEUPDATE_IOCTL_TYPE, 0, int), &cs));
		report("terminal_ioctl", ioctl(dev, FIONREAD, &n));
		report("session_cmd_on_device", ioctl(dev, LIVEUPDATE_SESSION_FINISH, &fin));
		ses = create(dev, "errors");
		report("finish_outgoing", ioctl(ses, LIVEUPDATE_SESSION_FINISH, &fin));
		report("fioclex", ioctl(dev, FIONCLEX));
		printf("cloexec_after_fionclex: %d\n", fcntl(dev, F_GETFD) & FD_CLOEXEC);
		report("fioclex", ioctl(dev, FIOCLEX));
		printf("cloexec_after_fioclex: %d\n", fcntl(dev, F_GETFD) & FD_CLOEXEC);
		return 0;
	}
	if (strcmp(cmd, "fork") == 0) {
		dev = open_device();
		ses = create(dev, "forked");
		pid = fork();
		if (pid == 0) {
			get_name(ses); /* the child, on the inherited session fd */
			_exit(0);
		}
		waitpid(pid, &status, 0);
		get_name(ses);
		return 0;
	}
	if (strcmp(cmd, "exec") == 0)
		return exec_with_fds(argv[0], "execed");
	if (strcmp(cmd, "execed") == 0 && argc == 4) {
		get_name(atoi(argv[2]));
		create(atoi(argv[3]), "created-after-exec");
		return 0;
	}
	if (strcmp(cmd, "dup2") == 0) {
		struct liveupdate_ioctl_create_session cs = { .size = sizeof(cs) };

		dev = open_device();
		ses = create(dev, "duplicated");
		/* The device's number now names the session: session calls work on
		 * it, device calls are refused as on a session fd. */
		report("dup2", dup2(ses, dev));
		get_name(dev);
		strcpy((char *)cs.name, "other");
		report("create_on_session", ioctl(dev, LIVEUPDATE_IOCTL_CREATE_SESSION, &cs));
		/* And a plain file over the session's number goes to libc. */
		fd = open("/proc/self/exe", O_RDONLY);
		report("dup2_file", dup2(fd, ses));
		report("fionread_on_file", ioctl(ses, FIONREAD, &n));
		printf("fionread_bytes: %s\n", n > 0 ? "some" : "none");
		return 0;
	}
	if (strcmp(cmd, "reuse") == 0 && argc == 3) {
		dev = open_device();
		ses = create(dev, "reused");
		report("fionread_on_session", ioctl(ses, FIONREAD, &n));
		close(ses);
		fd = open(argv[2], O_RDONLY);
		printf("same_number: %s\n", fd == ses ? "yes" : "no");
		n = -1;
		report("fionread_on_file", ioctl(fd, FIONREAD, &n));
		printf("fionread_bytes: %d\n", n);
		get_name(fd);
		return 0;
	}
	if (strcmp(cmd, "gone-exec") == 0)
		return exec_with_fds(argv[0], "gone-execed");
	if (strcmp(cmd, "gone-execed") == 0 && argc == 4) {
		/* Nothing was asked of luod since the exec: the shim meets these
		 * fds only after luod went away. */
		wait_stdin(); /* the test stops luod */
		get_name(atoi(argv[2]));
		create(atoi(argv[3]), "after");
		return 0;
	}
	if (strcmp(cmd, "gone") == 0) {
		dev = open_device();
		ses = create(dev, "gone");
		wait_stdin(); /* the test stops luod */
		get_name(ses);
		ses = create(dev, "after");
		return 0;
	}
	fprintf(stderr, "usage: %s errors|fork|exec|dup2|reuse FILE|gone|gone-exec\n", argv[0]);
	return 2;
}
