/* SPDX-License-Identifier: GPL-2.0-only */
/*
 * shared_fd - many processes and threads calling on one shared session fd.
 *
 *   shared_fd PROCESSES CALLS        run the test (under the shim, or on a kernel)
 *   shared_fd worker FD INDEX CALLS  one exec'd caller (inherits FD)
 *
 * The parent opens /dev/liveupdate, creates session "shared" and preserves a
 * memfd under token 7. Then PROCESSES callers hammer the one session fd at
 * once: forked children, exec'd children (they know nothing of the parent),
 * a child running 4 threads, and the parent itself. Every call's answer must
 * be its caller's: SYNC echoes a cookie made of the caller's index and the
 * call's number, GET_NAME the session's name, PRESERVE_FD + UNPRESERVE_FD a
 * token only that caller uses, and RETRIEVE_FD on an outgoing session fails
 * with EINVAL. Prints "ok CALLERS CALLS" and exits 0, or the first mix-up.
 * Built against our header only; linked to nothing of ours.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#include <liveupdate/luo.h>

#define THREADS 4

static int hammer(int fd, unsigned int index, unsigned int calls)
{
	int memfd = memfd_create("shared-fd", MFD_CLOEXEC);
	unsigned int i;

	if (memfd < 0)
		return perror("memfd_create"), 1;
	for (i = 0; i < calls; i++) {
		uint64_t cookie = ((uint64_t)index << 32) | i;
		struct luod_session_sync sync = { .size = sizeof(sync), .cookie = cookie };

		if (ioctl(fd, LUOD_SESSION_SYNC, &sync) != 0 || sync.cookie != cookie) {
			fprintf(stderr, "caller %u call %u: SYNC %s cookie %#" PRIx64 "\n", index, i,
				strerror(errno), (uint64_t)sync.cookie);
			return 1;
		}
		if (i % 5 == 1) {
			struct liveupdate_session_get_name arg = { .size = sizeof(arg) };

			if (ioctl(fd, LIVEUPDATE_SESSION_GET_NAME, &arg) != 0 ||
			    strcmp((char *)arg.name, "shared") != 0) {
				fprintf(stderr, "caller %u call %u: GET_NAME\n", index, i);
				return 1;
			}
		}
		if (i % 10 == 2) {
			struct liveupdate_session_preserve_fd keep = {
				.size = sizeof(keep), .fd = memfd, .token = cookie
			};
			struct luod_session_unpreserve_fd drop = { .size = sizeof(drop), .token = cookie };

			if (ioctl(fd, LIVEUPDATE_SESSION_PRESERVE_FD, &keep) != 0 ||
			    ioctl(fd, LUOD_SESSION_UNPRESERVE_FD, &drop) != 0) {
				fprintf(stderr, "caller %u call %u: PRESERVE/UNPRESERVE %s\n", index, i,
					strerror(errno));
				return 1;
			}
		}
		if (i % 7 == 3) {
			struct liveupdate_session_retrieve_fd arg = {
				.size = sizeof(arg), .fd = -1, .token = 7
			};

			if (ioctl(fd, LIVEUPDATE_SESSION_RETRIEVE_FD, &arg) == 0 || errno != EINVAL) {
				fprintf(stderr, "caller %u call %u: RETRIEVE_FD %s\n", index, i,
					strerror(errno));
				return 1;
			}
		}
	}
	close(memfd);
	return 0;
}

struct job {
	int fd;
	unsigned int index, calls;
	int result;
};

static void *thread_main(void *arg)
{
	struct job *job = arg;

	job->result = hammer(job->fd, job->index, job->calls);
	return NULL;
}

int main(int argc, char **argv)
{
	struct liveupdate_ioctl_create_session create = { .size = sizeof(create), .fd = -1 };
	struct liveupdate_session_preserve_fd keep = { .size = sizeof(keep), .token = 7 };
	unsigned int processes, calls, i, t;
	char fdarg[16], idxarg[16], callsarg[16];
	pid_t pids[64];
	int dev, fd, status, failed = 0;

	if (argc == 5 && strcmp(argv[1], "worker") == 0)
		return hammer(atoi(argv[2]), (unsigned int)atoi(argv[3]), (unsigned int)atoi(argv[4]));
	if (argc != 3)
		return fprintf(stderr, "usage: shared_fd PROCESSES CALLS\n"), 2;
	processes = (unsigned int)atoi(argv[1]);
	calls = (unsigned int)atoi(argv[2]);
	if (processes < 4 || processes > 64)
		return fprintf(stderr, "4 to 64 processes\n"), 2;
	dev = open("/dev/liveupdate", O_RDWR | O_CLOEXEC);
	if (dev < 0)
		return perror("open /dev/liveupdate"), 1;
	strcpy((char *)create.name, "shared");
	if (ioctl(dev, LIVEUPDATE_IOCTL_CREATE_SESSION, &create) != 0)
		return perror("CREATE_SESSION"), 1;
	fd = create.fd;
	keep.fd = memfd_create("kept", MFD_CLOEXEC);
	if (ioctl(fd, LIVEUPDATE_SESSION_PRESERVE_FD, &keep) != 0)
		return perror("PRESERVE_FD"), 1;
	/* The session fd is inherited across exec from here on. */
	fcntl(fd, F_SETFD, 0);
	snprintf(fdarg, sizeof(fdarg), "%d", fd);
	snprintf(callsarg, sizeof(callsarg), "%u", calls);
	for (i = 0; i + 1 < processes; i++) {
		pids[i] = fork();
		if (pids[i] < 0)
			return perror("fork"), 1;
		if (pids[i] > 0)
			continue;
		if (i % 3 == 0) { /* exec'd: no memory of the parent at all */
			snprintf(idxarg, sizeof(idxarg), "%u", i);
			execl("/proc/self/exe", argv[0], "worker", fdarg, idxarg, callsarg, (char *)NULL);
			_exit(127);
		}
		if (i % 3 == 1) { /* threads of one forked child */
			struct job jobs[THREADS];
			pthread_t threads[THREADS];
			int bad = 0;

			for (t = 0; t < THREADS; t++) {
				jobs[t] = (struct job){ fd, 1000 + i * THREADS + t, calls / THREADS, 0 };
				pthread_create(&threads[t], NULL, thread_main, &jobs[t]);
			}
			for (t = 0; t < THREADS; t++) {
				pthread_join(threads[t], NULL);
				bad |= jobs[t].result;
			}
			_exit(bad);
		}
		_exit(hammer(fd, i, calls)); /* forked */
	}
	failed |= hammer(fd, processes, calls); /* the parent, directly */
	for (i = 0; i + 1 < processes; i++) {
		if (waitpid(pids[i], &status, 0) < 0 || !WIFEXITED(status) || WEXITSTATUS(status)) {
			fprintf(stderr, "caller %u failed (status %#x)\n", i, status);
			failed = 1;
		}
	}
	if (failed)
		return 1;
	printf("ok %u %u\n", processes, calls);
	return 0;
}
