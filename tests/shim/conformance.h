/* SPDX-License-Identifier: GPL-2.0-only */
/*
 * What the two conformance programs (conformance.c, conformance_c.c) share:
 * the line format the tests compare, "<id> <step> <OK, errno name or
 * MISMATCH>", and the calls they make, each answering 0 or its errno.
 * Written against liveupdate/luo.h only.
 */
#ifndef CONFORMANCE_H
#define CONFORMANCE_H

#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <sys/ioctl.h>

#include <liveupdate/luo.h>

#define DEVICE "/dev/liveupdate"

/* Starts every session name: "PREFIX-suffix". */
static const char *prefix;

static inline void line(const char *id, const char *step, int err)
{
	printf("%s %s %s\n", id, step, err ? strerrorname_np(err) : "OK");
	fflush(stdout);
}

static inline void verdict(const char *id, const char *step, int ok)
{
	printf("%s %s %s\n", id, step, ok ? "OK" : "MISMATCH");
	fflush(stdout);
}

static inline void skip(const char *id, const char *why)
{
	printf("%s skip %s\n", id, why);
	fflush(stdout);
}

/* ioctl(): 0 or its errno. */
static inline int call(int fd, unsigned long cmd, void *arg)
{
	return ioctl(fd, cmd, arg) < 0 ? errno : 0;
}

static inline void session_name(char *out, const char *suffix)
{
	snprintf(out, LIVEUPDATE_SESSION_NAME_LENGTH, "%s-%s", prefix, suffix);
}

/* CREATE_SESSION or RETRIEVE_SESSION "PREFIX-suffix": 0 and *out, or the errno. */
static inline int session_call(int dev, unsigned long cmd, const char *suffix, int *out)
{
	/* Both structs are {size, fd, name}; the size is the same. */
	struct liveupdate_ioctl_create_session s = { .size = sizeof(s), .fd = -1 };
	int err;

	session_name((char *)s.name, suffix);
	err = call(dev, cmd, &s);
	*out = err ? -1 : s.fd;
	return err;
}

static inline int create(int dev, const char *suffix, int *out)
{
	return session_call(dev, LIVEUPDATE_IOCTL_CREATE_SESSION, suffix, out);
}

static inline int preserve(int session, int fd, __u64 token)
{
	struct liveupdate_session_preserve_fd pf = { .size = sizeof(pf), .fd = fd, .token = token };

	return call(session, LIVEUPDATE_SESSION_PRESERVE_FD, &pf);
}

#endif
