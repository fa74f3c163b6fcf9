/* SPDX-License-Identifier: GPL-2.0-only */
/*
 * preserve_memfd - keep a memfd's contents across a live update.
 *
 * Plain LUO: open("/dev/liveupdate") and ioctl(), nothing of liveupdate's
 * linked in. It runs unchanged on a LUO kernel (across a kexec) and, with
 * LD_PRELOAD=libluoshim.so, against luod (across `luoctl reboot`).
 *
 *   preserve_memfd preserve NAME TEXT   create session NAME, preserve a memfd
 *                                       holding TEXT (token 1), print
 *                                       "preserved", then hold the session
 *                                       open until stdin closes
 *   preserve_memfd restore NAME         after the update: retrieve the
 *                                       session and the memfd, print its
 *                                       contents, finish the session
 *
 * Build: gcc -I"$(python -c 'import liveupdate.shim as s; print(s.include_dir())')" \
 *            -o preserve_memfd preserve_memfd.c
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <liveupdate/luo.h>

#define TOKEN 1

static int die(const char *what)
{
	fprintf(stderr, "preserve_memfd: %s: %s\n", what, strerror(errno));
	return 1;
}

static int preserve(const char *name, const char *text)
{
	struct liveupdate_ioctl_create_session create = { .size = sizeof(create) };
	struct liveupdate_session_preserve_fd keep = { .size = sizeof(keep) };
	char line[16];
	int dev, mem;

	dev = open("/dev/liveupdate", O_RDWR | O_CLOEXEC);
	if (dev < 0)
		return die("open /dev/liveupdate");
	strncpy((char *)create.name, name, sizeof(create.name) - 1);
	if (ioctl(dev, LIVEUPDATE_IOCTL_CREATE_SESSION, &create) < 0)
		return die("LIVEUPDATE_IOCTL_CREATE_SESSION");
	mem = memfd_create("preserve_memfd", MFD_CLOEXEC);
	if (mem < 0)
		return die("memfd_create");
	if (write(mem, text, strlen(text)) != (ssize_t)strlen(text))
		return die("write");
	keep.fd = mem;
	keep.token = TOKEN;
	if (ioctl(create.fd, LIVEUPDATE_SESSION_PRESERVE_FD, &keep) < 0)
		return die("LIVEUPDATE_SESSION_PRESERVE_FD");
	/* The device may close: the session lives as long as its own fd. */
	close(dev);
	printf("preserved %s\n", name);
	fflush(stdout);
	while (fgets(line, sizeof(line), stdin))
		;
	return 0;
}

static int restore(const char *name)
{
	struct liveupdate_ioctl_retrieve_session get = { .size = sizeof(get) };
	struct liveupdate_session_retrieve_fd file = { .size = sizeof(file), .token = TOKEN };
	struct liveupdate_session_finish finish = { .size = sizeof(finish) };
	char data[4096];
	ssize_t n;
	int dev;

	dev = open("/dev/liveupdate", O_RDWR | O_CLOEXEC);
	if (dev < 0)
		return die("open /dev/liveupdate");
	strncpy((char *)get.name, name, sizeof(get.name) - 1);
	if (ioctl(dev, LIVEUPDATE_IOCTL_RETRIEVE_SESSION, &get) < 0)
		return die("LIVEUPDATE_IOCTL_RETRIEVE_SESSION");
	if (ioctl(get.fd, LIVEUPDATE_SESSION_RETRIEVE_FD, &file) < 0)
		return die("LIVEUPDATE_SESSION_RETRIEVE_FD");
	n = pread(file.fd, data, sizeof(data) - 1, 0);
	if (n < 0)
		return die("pread");
	data[n] = '\0';
	if (ioctl(get.fd, LIVEUPDATE_SESSION_FINISH, &finish) < 0)
		return die("LIVEUPDATE_SESSION_FINISH");
	printf("restored %s: %s\n", name, data);
	close(file.fd);
	close(get.fd);
	close(dev);
	return 0;
}

int main(int argc, char **argv)
{
	if (argc == 4 && strcmp(argv[1], "preserve") == 0)
		return preserve(argv[2], argv[3]);
	if (argc == 3 && strcmp(argv[1], "restore") == 0)
		return restore(argv[2]);
	fprintf(stderr, "usage: %s preserve NAME TEXT | restore NAME\n", argv[0]);
	return 2;
}
