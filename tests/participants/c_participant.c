/*
 * A participant written in C against liveupdate/luo.h: the REGISTER ioctl
 * goes through the shim (LD_PRELOAD), the participant fd is plain read() and
 * write(). Usage: c_participant NAME U64 -- prints one line per thing seen
 * and answers FREEZE with the u64 as its data.
 */
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <unistd.h>

#include <liveupdate/luo.h>

int main(int argc, char **argv)
{
	struct luod_register_participant reg;
	uint64_t value;
	int dev, fd;

	if (argc != 3)
		return 2;
	value = strtoull(argv[2], NULL, 0);
	dev = open("/dev/liveupdate", O_RDWR | O_CLOEXEC);
	if (dev < 0) {
		perror("open");
		return 1;
	}
	memset(&reg, 0, sizeof(reg));
	reg.size = sizeof(reg);
	strncpy((char *)reg.name, argv[1], sizeof(reg.name) - 1);
	if (ioctl(dev, LUOD_IOCTL_REGISTER_PARTICIPANT, &reg) < 0) {
		printf("register-failed %d\n", errno);
		return 1;
	}
	close(dev);
	fd = reg.fd;
	if (reg.data_len == sizeof(uint64_t)) {
		uint64_t carried;

		memcpy(&carried, reg.data, sizeof(carried));
		printf("registered %" PRIu64 "\n", carried);
	} else {
		printf("registered none %u\n", reg.data_len);
	}
	fflush(stdout);
	for (;;) {
		struct luod_participant_event ev;
		struct luod_participant_answer ans;
		ssize_t n = read(fd, &ev, sizeof(ev));

		if (n == 0) {
			printf("closed\n");
			return 0;
		}
		if (n < (ssize_t)sizeof(ev) || ev.size < sizeof(ev))
			return 3;
		printf("event %u generation %" PRIu64 "\n", ev.event, (uint64_t)ev.generation);
		fflush(stdout);
		memset(&ans, 0, sizeof(ans));
		ans.size = sizeof(ans);
		ans.seq = ev.seq;
		if (ev.event == LUOD_PARTICIPANT_FREEZE) {
			ans.flags = LUOD_PARTICIPANT_ANSWER_DATA;
			ans.data_len = sizeof(value);
			memcpy(ans.data, &value, sizeof(value));
		}
		if (write(fd, &ans, sizeof(ans)) != (ssize_t)sizeof(ans))
			return 4;
	}
}
