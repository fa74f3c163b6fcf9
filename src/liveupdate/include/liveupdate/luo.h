/* SPDX-License-Identifier: GPL-2.0-only */
/*
 * liveupdate/luo.h - the Live Update Orchestrator ioctl ABI for C programs.
 *
 * Written for the liveupdate project from its specification (the ABI facts of
 * docs/uapi.md); the Python twin is liveupdate/uapi.py and a test keeps the
 * two identical. The upstream block is byte-compatible with Linux's LUO
 * ioctls, so a program built against this header runs unchanged on a LUO
 * kernel (/dev/liveupdate) and, under libluoshim.so, against luod.
 *
 * Every struct opens with "__u32 size": set it to sizeof the struct you
 * pass. Every number is _IO(LIVEUPDATE_IOCTL_TYPE, nr): no direction or size
 * bits. The LUOD_* blocks are luod's own extensions; a kernel answers them
 * ENOTTY (or EINVAL).
 */
#ifndef LIVEUPDATE_LUO_H
#define LIVEUPDATE_LUO_H

#include <linux/ioctl.h>
#include <linux/types.h>

#define LIVEUPDATE_IOCTL_TYPE 0xBA
/* A session name: 1 to 63 bytes and a NUL. */
#define LIVEUPDATE_SESSION_NAME_LENGTH 64

/* Command blocks, each packed from its base. */
enum {
	LIVEUPDATE_CMD_BASE = 0x00,
	LIVEUPDATE_CMD_CREATE_SESSION = LIVEUPDATE_CMD_BASE,
	LIVEUPDATE_CMD_RETRIEVE_SESSION,
};

enum {
	LIVEUPDATE_CMD_SESSION_BASE = 0x40,
	LIVEUPDATE_CMD_SESSION_PRESERVE_FD = LIVEUPDATE_CMD_SESSION_BASE,
	LIVEUPDATE_CMD_SESSION_RETRIEVE_FD,
	LIVEUPDATE_CMD_SESSION_FINISH,
	LIVEUPDATE_CMD_SESSION_GET_NAME,
};

enum {
	LUOD_CMD_BASE = 0x80,
	LUOD_CMD_GET_STATE = LUOD_CMD_BASE,
	LUOD_CMD_SET_EVENT,
	LUOD_CMD_LIST_SESSIONS,
	LUOD_CMD_REGISTER_PARTICIPANT,
};

enum {
	LUOD_CMD_SESSION_BASE = 0xC0,
	LUOD_CMD_SESSION_UPDATE = LUOD_CMD_SESSION_BASE,
	LUOD_CMD_SESSION_SET_FLAGS,
	LUOD_CMD_SESSION_UNPRESERVE_FD,
	LUOD_CMD_SESSION_SYNC,
	LUOD_CMD_SESSION_SET_SERVICE,
};

/*
 * struct liveupdate_ioctl_create_session - ioctl(LIVEUPDATE_IOCTL_CREATE_SESSION)
 * @size: Input; sizeof(struct liveupdate_ioctl_create_session).
 * @fd:   Output; the new session's fd (close-on-exec). Its input value is ignored.
 * @name: Input; the session name, NUL-terminated.
 *
 * Creates an outgoing session. Return: 0; EINVAL (bad name), ENOMEM (session
 * limit), EEXIST (an outgoing session has the name).
 */
struct liveupdate_ioctl_create_session {
	__u32 size;
	__s32 fd;
	__u8 name[LIVEUPDATE_SESSION_NAME_LENGTH];
};

/*
 * struct liveupdate_ioctl_retrieve_session - ioctl(LIVEUPDATE_IOCTL_RETRIEVE_SESSION)
 * @size: Input; sizeof(struct liveupdate_ioctl_retrieve_session).
 * @fd:   Output; the incoming session's fd (close-on-exec).
 * @name: Input; the name of an incoming session, NUL-terminated.
 *
 * Return: 0; ENOENT (no such incoming session), EINVAL (already retrieved).
 */
struct liveupdate_ioctl_retrieve_session {
	__u32 size;
	__s32 fd;
	__u8 name[LIVEUPDATE_SESSION_NAME_LENGTH];
};

/*
 * struct liveupdate_session_preserve_fd - ioctl(LIVEUPDATE_SESSION_PRESERVE_FD)
 * @size:  Input; sizeof(struct liveupdate_session_preserve_fd).
 * @fd:    Input; the fd to preserve (the caller keeps it and may close it).
 * @token: Input; the file's key within the session (any value).
 *
 * Outgoing sessions only. Return: 0; EINVAL, EEXIST (token taken), ENOSPC,
 * EBADF, ENOENT (no handler for this file), EBUSY (already preserved).
 */
struct liveupdate_session_preserve_fd {
	__u32 size;
	__s32 fd;
	__aligned_u64 token;
};

/*
 * struct liveupdate_session_retrieve_fd - ioctl(LIVEUPDATE_SESSION_RETRIEVE_FD)
 * @size:  Input; sizeof(struct liveupdate_session_retrieve_fd).
 * @fd:    Output; a new fd for the preserved file (close-on-exec).
 * @token: Input; the token the file was preserved under.
 *
 * Incoming sessions only; may be repeated. Return: 0; EINVAL, ENOENT.
 */
struct liveupdate_session_retrieve_fd {
	__u32 size;
	__s32 fd;
	__aligned_u64 token;
};

/*
 * struct liveupdate_session_finish - ioctl(LIVEUPDATE_SESSION_FINISH)
 * @size:     Input; sizeof(struct liveupdate_session_finish).
 * @reserved: Input; must be 0.
 *
 * Incoming sessions only; idempotent. Return: 0; EINVAL, EBUSY.
 */
struct liveupdate_session_finish {
	__u32 size;
	__u32 reserved;
};

/*
 * struct liveupdate_session_get_name - ioctl(LIVEUPDATE_SESSION_GET_NAME)
 * @size:     Input; sizeof(struct liveupdate_session_get_name).
 * @reserved: Input; must be 0.
 * @name:     Output; the session's name, NUL-terminated.
 *
 * Return: 0; EINVAL when @reserved is not 0.
 */
struct liveupdate_session_get_name {
	__u32 size;
	__u32 reserved;
	__u8 name[LIVEUPDATE_SESSION_NAME_LENGTH];
};

/* luod's extensions: documented in full in docs/uapi.md. */

enum luod_state {
	LUOD_STATE_NORMAL = 0,
	LUOD_STATE_PREPARED = 1,
	LUOD_STATE_FROZEN = 2,
	LUOD_STATE_UPDATED = 3,
};

enum luod_event {
	LUOD_EVENT_PREPARE = 1,
	LUOD_EVENT_CANCEL = 2,
	LUOD_EVENT_REBOOT = 3,
	LUOD_EVENT_FINISH = 4,
};

enum luod_copies {
	LUOD_COPIES_OFF = 0,
	LUOD_COPIES_KEEPER = 1,
	LUOD_COPIES_FDSTORE = 2,
};

#define LUOD_REBOOT_NO_EXEC (1U << 0)
#define LUOD_SET_EVENT_FLAGS LUOD_REBOOT_NO_EXEC
#define LUOD_ERROR_LENGTH 256
#define LUOD_STATE_LOST_INCOMPLETE (1U << 0)
#define LUOD_LIST_FILES (1U << 0)
#define LUOD_LIST_FLAGS LUOD_LIST_FILES
#define LUOD_SESSION_KEEP_ON_CLOSE (1U << 0)
#define LUOD_SESSION_FLAGS LUOD_SESSION_KEEP_ON_CLOSE
#define LUOD_SERVICE_PID_MAX ((1U << 22) - 1)
#define LUOD_PARTICIPANT_DATA_MAX 256
#define LUOD_PARTICIPANT_TIMEOUT_MS 5000
#define LUOD_PARTICIPANT_ANSWER_DATA (1U << 0)
#define LUOD_PARTICIPANT_ANSWER_FLAGS LUOD_PARTICIPANT_ANSWER_DATA

enum luod_participant_event_type {
	LUOD_PARTICIPANT_PREPARE = 1,
	LUOD_PARTICIPANT_FREEZE = 2,
	LUOD_PARTICIPANT_CANCEL = 3,
	LUOD_PARTICIPANT_FINISH = 4,
};

/* struct luod_get_state - ioctl(LUOD_IOCTL_GET_STATE); mandatory up to @generation. */
struct luod_get_state {
	__u32 size;
	__u32 state;
	__aligned_u64 generation;
	__u32 outgoing_sessions;
	__u32 incoming_sessions;
	__u32 preserved_files;
	__u32 max_sessions;
	__u32 max_files;
	__u32 lost_sessions;
	__u8 last_error[LUOD_ERROR_LENGTH];
	__u32 journal_error;
	__u32 flags;
	__u32 pid;
	__u32 copies;
	__u32 copies_error;
	__u32 last_reboot_error;
	__u32 recovered_sessions;
	__u32 recovered_files;
	__u32 fd_limit;
	__u32 fds_open;
	__u32 fd_reserve;
	__u32 fds_per_file;
	__aligned_u64 started_ns;
	__aligned_u64 cold_started_ns;
	__aligned_u64 last_reboot_ns;
	__aligned_u64 last_reboot_blackout_ns;
};

/* struct luod_set_event - ioctl(LUOD_IOCTL_SET_EVENT); mandatory up to @flags. */
struct luod_set_event {
	__u32 size;
	__u32 event;
	__u32 flags;
	__u32 reserved;
	__aligned_u64 generation;
};

/* struct luod_list_sessions - ioctl(LUOD_IOCTL_LIST_SESSIONS); @fd out is a JSON memfd. */
struct luod_list_sessions {
	__u32 size;
	__s32 fd;
	__u32 flags;
	__u32 count;
	__u32 hidden;
	__u32 reserved;
	__u8 name[LIVEUPDATE_SESSION_NAME_LENGTH];
};

/*
 * struct luod_register_participant - ioctl(LUOD_IOCTL_REGISTER_PARTICIPANT).
 * @fd out is the participant fd: read() one struct luod_participant_event per
 * phase, write() one struct luod_participant_answer with the same @seq.
 */
struct luod_register_participant {
	__u32 size;
	__s32 fd;
	__u32 flags;
	__u32 data_len;
	__u8 name[LIVEUPDATE_SESSION_NAME_LENGTH];
	__u8 data[LUOD_PARTICIPANT_DATA_MAX];
};

/* struct luod_participant_event - message(luod to participant) */
struct luod_participant_event {
	__u32 size;
	__u32 event;
	__aligned_u64 seq;
	__u32 timeout_ms;
	__u32 reserved;
	__aligned_u64 generation;
};

/* struct luod_participant_answer - message(participant to luod); mandatory up to @data_len. */
struct luod_participant_answer {
	__u32 size;
	__u32 flags;
	__aligned_u64 seq;
	__u32 error;
	__u32 data_len;
	__u8 data[LUOD_PARTICIPANT_DATA_MAX];
};

/* struct luod_session_update - ioctl(LUOD_SESSION_UPDATE) */
struct luod_session_update {
	__u32 size;
	__u32 reserved;
};

/* struct luod_session_set_flags - ioctl(LUOD_SESSION_SET_FLAGS) */
struct luod_session_set_flags {
	__u32 size;
	__u32 flags;
	__u32 old_flags;
};

/* struct luod_session_unpreserve_fd - ioctl(LUOD_SESSION_UNPRESERVE_FD) */
struct luod_session_unpreserve_fd {
	__u32 size;
	__u32 reserved;
	__aligned_u64 token;
};

/* struct luod_session_sync - ioctl(LUOD_SESSION_SYNC) */
struct luod_session_sync {
	__u32 size;
	__u32 reserved;
	__aligned_u64 cookie;
};

/* struct luod_session_set_service - ioctl(LUOD_SESSION_SET_SERVICE) */
struct luod_session_set_service {
	__u32 size;
	__u32 flags;
	__u32 pid;
	__u32 restarts;
	__s32 last_exit;
	__u32 reserved;
};

#define LIVEUPDATE_IOCTL_CREATE_SESSION \
	_IO(LIVEUPDATE_IOCTL_TYPE, LIVEUPDATE_CMD_CREATE_SESSION)
#define LIVEUPDATE_IOCTL_RETRIEVE_SESSION \
	_IO(LIVEUPDATE_IOCTL_TYPE, LIVEUPDATE_CMD_RETRIEVE_SESSION)
#define LIVEUPDATE_SESSION_PRESERVE_FD \
	_IO(LIVEUPDATE_IOCTL_TYPE, LIVEUPDATE_CMD_SESSION_PRESERVE_FD)
#define LIVEUPDATE_SESSION_RETRIEVE_FD \
	_IO(LIVEUPDATE_IOCTL_TYPE, LIVEUPDATE_CMD_SESSION_RETRIEVE_FD)
#define LIVEUPDATE_SESSION_FINISH \
	_IO(LIVEUPDATE_IOCTL_TYPE, LIVEUPDATE_CMD_SESSION_FINISH)
#define LIVEUPDATE_SESSION_GET_NAME \
	_IO(LIVEUPDATE_IOCTL_TYPE, LIVEUPDATE_CMD_SESSION_GET_NAME)
#define LUOD_IOCTL_GET_STATE _IO(LIVEUPDATE_IOCTL_TYPE, LUOD_CMD_GET_STATE)
#define LUOD_IOCTL_SET_EVENT _IO(LIVEUPDATE_IOCTL_TYPE, LUOD_CMD_SET_EVENT)
#define LUOD_IOCTL_LIST_SESSIONS _IO(LIVEUPDATE_IOCTL_TYPE, LUOD_CMD_LIST_SESSIONS)
#define LUOD_IOCTL_REGISTER_PARTICIPANT \
	_IO(LIVEUPDATE_IOCTL_TYPE, LUOD_CMD_REGISTER_PARTICIPANT)
#define LUOD_SESSION_UPDATE _IO(LIVEUPDATE_IOCTL_TYPE, LUOD_CMD_SESSION_UPDATE)
#define LUOD_SESSION_SET_FLAGS _IO(LIVEUPDATE_IOCTL_TYPE, LUOD_CMD_SESSION_SET_FLAGS)
#define LUOD_SESSION_UNPRESERVE_FD \
	_IO(LIVEUPDATE_IOCTL_TYPE, LUOD_CMD_SESSION_UNPRESERVE_FD)
#define LUOD_SESSION_SYNC _IO(LIVEUPDATE_IOCTL_TYPE, LUOD_CMD_SESSION_SYNC)
#define LUOD_SESSION_SET_SERVICE _IO(LIVEUPDATE_IOCTL_TYPE, LUOD_CMD_SESSION_SET_SERVICE)

#endif /* LIVEUPDATE_LUO_H */
