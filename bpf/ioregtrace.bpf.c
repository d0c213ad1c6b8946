// SPDX-License-Identifier: GPL-2.0
/*
 * ioregtrace: classify every guest MMIO/PIO access by the path kvm.ko used to
 * dispatch it, and count and time it in the kernel.  Nothing is copied to
 * user space per event: the agent reads the maps below.
 *
 * Facts this program is built on (virt/kvm, arch/x86/kvm/x86.c):
 *  - An MMIO write emits kvm_mmio(WRITE) before dispatch, in-kernel or not.
 *  - An MMIO read served in the kernel emits kvm_mmio(READ).  A read sent to
 *    userspace emits kvm_mmio(READ_UNSATISFIED), and kvm_mmio(READ) again when
 *    KVM_RUN is re-entered with the data (that second event is a completion,
 *    not a new access).
 *  - A PIO OUT emits kvm_pio before dispatch.  A PIO IN emits kvm_pio only
 *    once it has data: at once when the kernel served it, or on re-entry
 *    when userspace did.
 *  - Every return from KVM_RUN emits kvm_userspace_exit(reason, errno).
 * So each vCPU thread carries one "pending" access: if the next thing that
 * thread does is an MMIO/IO exit for that access, it went to userspace;
 * otherwise kvm.ko served it, and the registrations seen in the VM's ioctls
 * (ioeventfds, coalesced zones) say which handler did.  For a VM created
 * before the attach, the agent seeds those tables from the VMM (QEMU) while
 * vm_info.seeding holds its accesses back (ioregtrace/attach.py).
 *
 * Which access an exit is for is read from the exit itself: KVM fills the
 * vCPU's struct kvm_run (mapped by the VMM at offset 0 of the vCPU fd)
 * before kvm_userspace_exit fires.  Without that, an in-kernel PIO OUT
 * followed by a PIO IN that exits (an RTC index/data pair) would look like
 * the OUT exiting: a PIO IN emits no event before its exit.
 *
 * Compile-time constants (SPACE_*, OP_*, PATH_*, KVM_*, HIST_*, map sizes)
 * come from the Python loader, generated from ioregtrace/keys.py,
 * ioregtrace/kvmapi.py and ioregtrace/histogram.py.
 */

/* bpf_probe_read_user[_str] under names BCC's rewriter does not know.  BCC
 * 0.26 checks the kernel for the helper at every call site of those names by
 * loading all of /proc/kallsyms (~0.1 s each here; attach time is mostly
 * compile time).  Every kernel this program can run on has them: task
 * storage (5.11) is newer than bpf_probe_read_user (5.5). */
static long (*read_user)(void *dst, u32 size, const void *src) =
	(void *)BPF_FUNC_probe_read_user;
static long (*read_user_str)(void *dst, u32 size, const void *src) =
	(void *)BPF_FUNC_probe_read_user_str;

/* What a program on a regular tracepoint returns.  The kernel hands the
 * event on to the perf events open on that tracepoint only when its BPF
 * programs return non-zero (perf_trace_run_bpf_submit): returning 0 would
 * hide every kvm_exit from a `perf kvm stat record` running beside us (seen:
 * perf recorded kvm_entry alone).  With no such perf event it costs nothing.
 * (Raw tracepoints have no such filter.) */
#define KEEP_EVENT 1

#define KVM_TRACE_MMIO_READ_UNSATISFIED 0
#define KVM_TRACE_MMIO_READ 1
#define KVM_TRACE_MMIO_WRITE 2

/* Indices of the counters map. */
#define CNT_DROPPED_ACCESSES 0  /* accesses not counted: accesses map full */
#define CNT_DROPPED_LATENCY 1   /* latency samples lost: latency map full */
#define CNT_LOST_EVENTS 2       /* events not processed: no per-thread state */
#define CNT_ATTACH_AMBIGUOUS 3  /* reads right after an unseen exit, at attach */
#define CNT_UNMATCHED_EXITS 4   /* MMIO exits with no traced access before them */
#define CNT_DROPPED_REGISTRATIONS 5 /* registrations that did not fit the tables */
#define CNT_DROPPED_VMS 6       /* VMM processes that did not fit the vms map */
#define CNT_INFERRED_EXITS 7    /* exits whose kvm_run could not be read */
#define CNT_LOST_LAYOUT 8       /* mirror events lost: layout ring buffer full */
#define CNT_LOST_RAW_EVENTS 9          /* raw access events lost: ring buffer full */
#define CNT_DROPPED_EXITS 10    /* exits not counted: exits map full */
#define NR_COUNTERS 11

struct access_key {
	u32 pid;        /* tgid of the VMM process (PER_VCPU: the vCPU thread) */
	u32 vm;         /* serial of that process in vms: pid reuse never merges */
	u64 addr;       /* guest physical address or port */
	u8 space;       /* SPACE_MMIO / SPACE_PIO */
	u8 op;          /* OP_READ / OP_WRITE */
	u8 path;        /* PATH_* */
	u8 size;        /* bytes per access */
	u32 layout;     /* the VMM's memory-map generation (QEMU mirror), else 0 */
};

struct latency {                /* the count is the histogram's sum */
	u64 sum_ns;
	u64 max_ns;
	/* HIST_SLOTS used; sized to a power of two so that a masked index
	 * is provably inside the array for the verifier. */
	u64 slots[HIST_ARRAY];
};

struct vm_info {
	u32 serial;
	u8 complete;    /* every registration is known: KVM_CREATE_VM was seen, or
			 * the agent read them from the VMM at attach (QEMU) */
	u8 created;     /* KVM_CREATE_VM was seen: no exit began before tracing */
	u8 seeding;     /* the agent is reading the VMM's registrations: apply its
			 * ioctls, count none of its accesses yet */
	u8 pad;
	char comm[16];
	u64 exited_ns;  /* its group leader exited (0: running); the pid may be reused */
};

struct reg_key {        /* one guest address of one VM on one bus */
	u32 pid;
	u32 vm;
	u64 addr;
	u64 space;
};

struct ioeventfd_slot {
	u64 datamatch;
	u32 len;        /* 0: any access length */
	u8 used;
	u8 wildcard;    /* no KVM_IOEVENTFD_FLAG_DATAMATCH */
	u16 pad;
};

struct ioeventfd_set {
	struct ioeventfd_slot slot[IOEVENTFD_SLOTS];
};

struct vm_key {
	u32 pid;
	u32 vm;
};

struct fd_key {
	u32 pid;
	u32 fd;
};

struct zone {
	u64 addr;
	u32 size;
	u8 pio;
	u8 used;
	u16 pad;
};

struct zone_set {
	struct zone zone[ZONE_SLOTS];
};

/* Every registration ever seen, never removed: the agent names regions by
 * the doorbell or zone an address belonged to, even after a deassign. */
struct reg_record {
	u32 pid;
	u32 vm;
	u64 addr;
	u32 size;
	u8 space;
	u8 kind;        /* REG_IOEVENTFD / REG_ZONE */
	u16 pad;
};
#define REG_IOEVENTFD 1
#define REG_ZONE 2
#define REG_IOREGION 3          /* names only: the send tracepoint gives the path */

/* struct kvm_ioeventfd and struct kvm_coalesced_mmio_zone (uapi) */
struct ioctl_ioeventfd {
	u64 datamatch;
	u64 addr;
	u32 len;
	s32 fd;
	u32 flags;
};

struct ioctl_zone {
	u64 addr;
	u32 size;
	u32 pio;
};

struct ioctl_ioregion {         /* the start of struct kvm_ioregion */
	u64 guest_paddr;
	u64 memory_size;
	u64 user_data;
	s32 read_fd;
	s32 write_fd;
	u32 flags;
};

/* The start of struct kvm_run (uapi), up to the exit data we decode. */
struct kvm_run_head {
	u8 request_interrupt_window;
	u8 immediate_exit;
	u8 padding1[6];
	u32 exit_reason;
	u8 ready_for_interrupt_injection;
	u8 if_flag;
	u16 flags;
	u64 cr8;
	u64 apic_base;
	union {
		struct {
			u8 direction;   /* KVM_EXIT_IO_IN 0, KVM_EXIT_IO_OUT 1 */
			u8 size;
			u16 port;
			u32 count;
			u64 data_offset;
		} io;
		struct {
			u64 phys_addr;
			u8 data[8];
			u32 len;
			u8 is_write;
		} mmio;
		struct {                /* KVM_EXIT_IOREGIONFD_FAILED (kernel/) */
			u64 addr;
			u64 user_data;
			u32 len;
			u8 is_write;
			u8 pio;
		} ioregionfd_failed;
	};
};

/* Exits of one key a vCPU thread holds back from the exits map (WITH_EXITS):
 * a run of one reason (a guest spinning on CPUID, a PIT, a doorbell) costs
 * one map update per EXIT_FLUSH exits, not one each. */
struct exit_batch {
	u32 reason;
	u16 err;
	u8 isa;
	u8 kind;
	u32 n;                  /* exits in the batch */
	u32 to_user;
	u32 timed;              /* of them timed: slot[0 .. timed) */
	u32 pad;
	u64 sum_ns;
	u64 min_ns;
	u64 max_ns;
	u16 slot[EXIT_FLUSH];
};

/* Per-thread state: see thread() for where it lives. */
struct thread_state {
	/* In 64-byte lines by when the fields are used: every event (with the
	 * classification cache); an access and its exit; the batches; then
	 * what is rarely touched.  A userspace exit touches four lines, not
	 * five, and finds them cold after the VMM ran: ~5 % of its BPF time
	 * (bench/RESULTS.md).  Aligned, so each thread_slots slot starts a line. */
	u64 tid;                /* the owner of a thread_slots slot, 0: free or in task
				 * storage (u64: BCC's LLVM has 64-bit compare-and-swap
				 * only) */
	u32 pid;                /* tgid, cached: one helper call less per event */
	u32 vm;
	u8 traced;              /* its accesses are counted */
	u8 watched;             /* its registrations and memory map are followed
				 * (traced, or its VM's registrations being read) */
	u8 complete;            /* copy of vm_info.complete */
	u8 synced;              /* saw an exit of this thread, or its VM created */
	u8 fresh_entry;         /* no kvm event yet since the last KVM_RUN entry */
	u8 closing;             /* the session is ending: see CFG_PHASE */
	u8 closed;              /* ... and has ended: this state is the final count */
	u8 pend_late;           /* pend_key was begun after the end began */
	u32 state_gen;          /* CFG_STATE_GEN when the caches below were filled */
	u32 run_fd;             /* the vCPU fd run_addr belongs to */
	u8 event_sent;          /* event mode: its last userspace access was sent */
	u8 pending;             /* pend_key holds an access awaiting its path */
	u8 exit_kind;           /* EXIT_* below */
	u8 await_mmio_read;     /* next kvm_mmio READ at await_addr is a completion */
	u8 await_pio_in;        /* next kvm_pio IN: the userspace IN that exited */
	u8 skip_pio_in;         /* next kvm_pio IN completes an IN already counted */

	/* one-entry classification cache (doorbell loops hit it) */
	u8 cache_space;
	u8 cache_size;
	u8 cache_path;
	u8 cache_by_value;      /* the answer depends on the written value */
	u32 cache_gen;
	u64 cache_addr;
	u64 cache_val;

	u32 pend_count;
	struct access_key pend_key;     /* path = the in-kernel candidate */
	u64 exit_ts;
	struct access_key exit_key;

	u64 run_addr;           /* this thread's struct kvm_run, 0: unknown */
	/* Counts not yet in the accesses map: a run of accesses with one key
	 * (a doorbell loop, a framebuffer fill) costs one map update. */
	struct access_key run_key;
	u32 run_count;

	/* Round trips not yet in the latencies map, batched like the counts:
	 * a hash lookup and the atomics once per LATENCY_FLUSH of them. */
	u32 lat_n;
	u64 lat_sum;
	u64 lat_max;
	struct access_key lat_key;
	u16 lat_slot[LATENCY_FLUSH];

	u64 await_addr;
	u64 pio_in_ns;          /* latency of the IN that exited, known at re-entry */
	u64 ioregion_ts;        /* an ioregionfd command sent, awaiting its response */
	struct access_key ioregion_key;
	u8 vcpu_created;        /* KVM_CREATE_VCPU: its kvm_run mmap comes next */
	u8 mmap_vcpu;           /* an mmap of a vCPU fd is between enter and exit */
	u32 mmap_fd;

	/* Exit tracing (WITH_EXITS), in a line of its own: kvm_exit and
	 * kvm_entry touch only this one and the first. */
	u64 hx_ts;              /* kvm_exit seen, its kvm_entry not yet (0: none) */
	u64 ux_ts;              /* KVM_RUN returned, the VMM's next KVM_RUN not yet */
	u32 hx_reason;          /* the open exit's VMX exit reason / SVM exit code */
	u32 ux_reason;          /* kvm_run.exit_reason of the open return */
	u16 ux_err;             /* its errno (KVM_RUN failed: -EINTR on a signal) */
	u8 hx_isa;              /* KVM_ISA_VMX 1, KVM_ISA_SVM 2 */
	u8 kx_valid;            /* kx_key: an access kvm.ko served in the open exit */
	struct access_key kx_key;
	struct exit_batch hb;   /* hardware exits held back */
	struct exit_batch ub;   /* returns to userspace held back */
} __attribute__((aligned(64)));

#define EXIT_NONE 0
#define EXIT_KEYED 1            /* exit_key is the access; time to next KVM_RUN */
#define EXIT_PIO_IN 2           /* IN went out; its key arrives with kvm_pio */

/* Most threads keep their state in the slot of thread_slots their thread id
 * indexes: an array lookup, which the verifier inlines.  A task-storage
 * lookup is a helper call, ~10-20 ns a program here (bench/RESULTS.md), of
 * ~60 for an in-kernel access in all.  A thread whose slot another live
 * thread holds keeps its state in task storage instead (freed with the
 * thread).  A thread frees its slot when it exits. */
BPF_ARRAY(thread_slots, struct thread_state, THREAD_SLOTS);
BPF_TASK_STORAGE(threads, struct thread_state);
/* Large and allocated on first use: a framebuffer alone brings tens of
 * thousands of distinct addresses, an idle VM a handful. */
BPF_F_TABLE("hash", struct access_key, u64, accesses, MAX_ACCESS_KEYS, BPF_F_NO_PREALLOC);
/* 2 KiB a key: allocated as used, not up front, so that the map can be
 * sized for a guest that sweeps a BAR or a framebuffer through userspace. */
BPF_F_TABLE("hash", struct access_key, struct latency, latencies, MAX_LATENCY_KEYS,
	    BPF_F_NO_PREALLOC);
/* Zeroed templates for new map values: too big for the 512-byte stack. */
BPF_PERCPU_ARRAY(latency_zero, struct latency, 1);
BPF_PERCPU_ARRAY(ioeventfd_zero, struct ioeventfd_set, 1);
BPF_PERCPU_ARRAY(zone_zero, struct zone_set, 1);
BPF_HASH(vms, u32, struct vm_info, MAX_VMS);
BPF_HASH(targets, u32, u8, MAX_TARGETS);       /* tgids to trace when filtering */
BPF_HASH(ioeventfds, struct reg_key, struct ioeventfd_set, MAX_IOEVENTFD_ADDRS);
BPF_HASH(zones, struct vm_key, struct zone_set, MAX_VMS);
BPF_HASH(reg_history, struct reg_record, u8, MAX_REG_HISTORY);
/* QEMU memory-map mirror: per VM, the current generation (bumped each time
 * QEMU builds a new flat view of system memory or I/O) and the last view
 * seen per space.  Indexed by vm serial; `vm` says whose the slot is. */
struct vm_layout {
	u32 vm;
	u32 gen;
	u64 fv[2];
};
BPF_ARRAY(layouts, struct vm_layout, MAX_VMS);

struct layout_event {
	u32 pid;
	u32 vm;
	u32 gen;        /* the generation this view starts */
	u8 space;
	u8 readonly;
	u16 pad;
	u64 fv;         /* QEMU's FlatView: sections of one view share it */
	u64 mr;         /* QEMU's MemoryRegion */
	u64 start;      /* offset_within_address_space */
	u64 size;       /* bytes (2^64 shows as 0) */
	u64 offset;     /* offset_within_region */
	char name[REGION_NAME_LEN];
};
BPF_RINGBUF_OUTPUT(layout_events, LAYOUT_RING_PAGES);
/* The agent drains its rings on its own schedule (ring_buffer_consume) and
 * never sleeps on them: a wakeup, which the kernel otherwise sends whenever
 * the reader has caught up (nearly every record, when it keeps up), would
 * be an interrupt per record for no one. */
#define RING_SUBMIT_FLAGS BPF_RB_NO_WAKEUP

/* vCPU fds of traced VMMs -> where their struct kvm_run is mapped (0 until
 * the mmap is seen; the agent fills in VMs that existed before attach). */
BPF_HASH(vcpu_runs, struct fd_key, u64, MAX_VCPUS);
BPF_PERCPU_ARRAY(counters, u64, NR_COUNTERS);
/* [0] filter on: only tgids in targets; [1] registration generation;
 * [2] next vm serial */
BPF_ARRAY(config, u64, 8);
#define CFG_MODE 0              /* MODE_* below */
#define CFG_REG_GEN 1
#define CFG_VM_SERIAL 2
#define CFG_MR_NAME_OFFSET 3    /* QEMU's MemoryRegion.name, from its binary */
#define CFG_EVENTS_LEFT 4       /* event mode: raw access events still to send */
#define CFG_STATE_GEN 5         /* bumped when what threads cache may change */
/* Nothing is traced until the agent has set the filter up: programs run
 * from the moment BCC attaches them, before the agent can fill its maps. */
#define MODE_SETTING_UP 0
#define MODE_ALL 1              /* every KVM VM on the host */
#define MODE_TARGETS 2          /* only the tgids in `targets` */
#define CFG_VCPU_MMAP_SIZE 6    /* KVM_GET_VCPU_MMAP_SIZE (0: unknown, any size) */
/* How a session ends: with one cut every thread agrees on.  An access
 * whose event came before the cut counts, by the path it took, even when
 * that path is known only at the thread's next event (a read's exit to
 * userspace comes microseconds after its READ_UNSATISFIED).  So the agent
 * first sets CLOSING: a thread that sees it marks what it begins from then
 * on as late, and the agent waits (briefly) for every access begun before
 * to be settled by its thread.  Then CLOSED: a thread that sees it changes
 * nothing any more, so the maps and the thread slots the agent reads last
 * are one consistent count. */
#define CFG_PHASE 7
#define PHASE_OPEN 0
#define PHASE_CLOSING 1
#define PHASE_CLOSED 2

static __always_inline void bump(int idx, u64 n)
{
	u64 *c = counters.lookup(&idx);
	if (c)
		*c += n;
}

static __always_inline u64 cfg(int idx)
{
	u64 *v = config.lookup(&idx);
	return v ? *v : 0;
}

static __always_inline struct vm_layout *layout_of(u32 vm)
{
	int idx = vm & (MAX_VMS - 1);
	struct vm_layout *l = layouts.lookup(&idx);
	return l && l->vm == vm ? l : 0;
}

/* The memory-map generation an access made now is served by (0 for VMMs
 * whose map is not mirrored).  An array slot: no hash lookup. */
static __always_inline u32 layout_now(struct thread_state *s)
{
	struct vm_layout *l = layout_of(s->vm);
	return l ? l->gen : 0;
}

static __always_inline void bump_state_gen(void)
{
	int idx = CFG_STATE_GEN;
	u64 *g = config.lookup(&idx);
	if (g)
		__sync_fetch_and_add(g, 1);
}

/* The VM serial of process `pid`.  A pid whose previous owner exited gets
 * a new serial: pid reuse never merges two VMs. */
static __always_inline struct vm_info *vm_of(u32 pid)
{
	struct vm_info *vi = vms.lookup(&pid);
	if (vi && !vi->exited_ns)
		return vi;
	struct vm_info fresh = {};
	int idx = CFG_VM_SERIAL;
	u64 *serial = config.lookup(&idx);
	if (!serial)
		return 0;
	fresh.serial = __sync_fetch_and_add(serial, 1) + 1;
	bpf_get_current_comm(&fresh.comm, sizeof(fresh.comm));
	vms.update(&pid, &fresh);
	vi = vms.lookup(&pid);
	if (!vi)
		bump(CNT_DROPPED_VMS, 1);
	return vi;
}

/* Re-read what the thread caches about its process: at creation, and at
 * every KVM_RUN entry (cheap there, and filters or registrations may have
 * changed).  The in-kernel hot path then needs no lookups for it. */
static __always_inline void refresh(struct thread_state *s, u32 pid)
{
	s->pid = pid;
	s->state_gen = cfg(CFG_STATE_GEN);
	u64 phase = cfg(CFG_PHASE);
	if (phase == PHASE_CLOSED) {
		s->closed = 1;
		return;
	}
	s->closing = phase == PHASE_CLOSING;
	u64 mode = cfg(CFG_MODE);
	s->traced = s->watched = 0;
	if (mode == MODE_SETTING_UP || (mode == MODE_TARGETS && !targets.lookup(&pid)))
		return;
	struct vm_info *vi = vm_of(pid);
	if (!vi)
		return;
	s->watched = 1;
	s->traced = !vi->seeding;
	if (s->vm != vi->serial)
		s->cache_gen = 0;
	s->vm = vi->serial;
	s->complete = vi->complete;
	if (vi->created)
		s->synced = 1;
}

static __always_inline struct thread_state *thread_slot(u32 tid)
{
	int idx = tid & (THREAD_SLOTS - 1);
	return thread_slots.lookup(&idx);
}

/* The state of thread `tid` (the current one), or 0 if it has none. */
static __always_inline struct thread_state *thread_find(u32 tid)
{
	struct thread_state *s = thread_slot(tid);
	if (s && s->tid == tid)
		return s;
	return threads.task_storage_get(bpf_get_current_task_btf(), 0, 0);
}

/* A new thread's state: its slot if free, else task storage. */
static __always_inline struct thread_state *thread_new(u32 tid)
{
	struct thread_state *s = thread_slot(tid);
	if (s && !s->tid && __sync_val_compare_and_swap(&s->tid, 0, (u64)tid) == 0) {
		/* The slot is ours; clear what its last owner left. */
		__builtin_memset(&s->pid, 0, sizeof(*s) - offsetof(struct thread_state, pid));
		return s;
	}
	return threads.task_storage_get(bpf_get_current_task_btf(), 0,
					BPF_LOCAL_STORAGE_GET_F_CREATE);
}

/* For programs that find a thread's state without thread(): has the
 * session ended, though this thread may not have seen it yet? */
static __always_inline int session_closed(struct thread_state *s)
{
	return s->closed || cfg(CFG_PHASE) == PHASE_CLOSED;
}

/* The current thread's state, created on its first event; 0 once the
 * session has ended (CFG_PHASE). */
static __always_inline struct thread_state *thread(void)
{
	u64 id = bpf_get_current_pid_tgid();
	struct thread_state *s = thread_find(id);
	if (s) {
		/* One array read per event: a filter change reaches even a
		 * vCPU that never leaves the guest. */
		if (s->state_gen != cfg(CFG_STATE_GEN))
			refresh(s, id >> 32);
		return s->closed ? 0 : s;
	}
	s = thread_new(id);
	if (!s) {
		bump(CNT_LOST_EVENTS, 1);
		return 0;
	}
	/* A thread first seen mid-KVM_RUN may be finishing an exit we never
	 * saw: fresh_entry makes its first read suspect (see on_read). */
	s->fresh_entry = 1;
	refresh(s, id >> 32);
	return s->closed ? 0 : s;
}

#ifdef WITH_EVENTS
/* Event mode (record --events N): the first N accesses, one by one, then
 * the latency of each userspace one when the VMM comes back. */
struct raw_event {
	u64 ts;
	u32 tid;
	u32 pid;
	u32 vm;
	u32 layout;
	u64 addr;
	u32 count;
	u8 space;
	u8 op;
	u8 path;
	u8 size;
	u8 kind;        /* RAW_ACCESS or RAW_LATENCY (of the thread's last access) */
	u8 pad[7];
	u64 latency_ns;
};
#define RAW_ACCESS 0
#define RAW_LATENCY 1
BPF_RINGBUF_OUTPUT(raw_events, RAW_RING_PAGES);

static __always_inline void send_access(struct thread_state *s, struct access_key *k, u64 n)
{
	int idx = CFG_EVENTS_LEFT;
	s64 *left = (s64 *)config.lookup(&idx);
	if (!left || *left <= 0 || __sync_fetch_and_add(left, -1) <= 0)
		return;
	struct raw_event *e = raw_events.ringbuf_reserve(sizeof(*e));
	if (!e) {
		bump(CNT_LOST_RAW_EVENTS, 1);
		return;
	}
	u64 id = bpf_get_current_pid_tgid();
	/* Not the exit's time for a userspace access, though read already: an
	 * in-kernel access settled at that exit is counted, and stamped, just
	 * before it, and events keep the order they are counted in. */
	e->ts = bpf_ktime_get_ns();
	e->tid = id;
	e->pid = id >> 32;
	e->vm = k->vm;
	e->layout = k->layout;
	e->addr = k->addr;
	e->count = n;
	e->space = k->space;
	e->op = k->op;
	e->path = k->path;
	e->size = k->size;
	e->kind = RAW_ACCESS;
	e->latency_ns = 0;
	raw_events.ringbuf_submit(e, RING_SUBMIT_FLAGS);
	/* a latency event follows for the round trips */
	s->event_sent = k->path == PATH_USERSPACE || k->path == PATH_IOREGIONFD;
}

static __always_inline void send_latency(struct thread_state *s, u64 ns)
{
	if (!s->event_sent)
		return;
	s->event_sent = 0;
	struct raw_event *e = raw_events.ringbuf_reserve(sizeof(*e));
	if (!e) {
		bump(CNT_LOST_RAW_EVENTS, 1);
		return;
	}
	u64 id = bpf_get_current_pid_tgid();
	__builtin_memset(e, 0, sizeof(*e));     /* ts too: only the access's is read */
	e->tid = id;
	e->pid = id >> 32;
	e->kind = RAW_LATENCY;
	e->latency_ns = ns;
	raw_events.ringbuf_submit(e, RING_SUBMIT_FLAGS);
}
#else
#define send_access(s, k, n) do { } while (0)
#define send_latency(s, ns) do { } while (0)
#endif

static __always_inline void add_to_map(struct access_key *k, u64 n)
{
	u64 zero = 0;
	u64 *v = accesses.lookup_or_try_init(k, &zero);
	if (v)
		__sync_fetch_and_add(v, n);
	else
		bump(CNT_DROPPED_ACCESSES, n);
}

/* Put the thread's pending run into the map.  Called when the key changes,
 * every RUN_FLUSH accesses, at every return from KVM_RUN other than an
 * MMIO/IO exit, and when the thread exits: the maps are complete whenever a
 * VMM pauses or ends, and at most RUN_FLUSH - 1 accesses per vCPU behind
 * while it runs. */
static __always_inline void flush_run(struct thread_state *s)
{
	if (s->run_count) {
		add_to_map(&s->run_key, s->run_count);
		s->run_count = 0;
	}
}

/* struct access_key is 24 bytes with no padding: three words to compare. */
static __always_inline int same_key(struct access_key *a, struct access_key *b)
{
	u64 *x = (u64 *)a, *y = (u64 *)b;
	return x[0] == y[0] && x[1] == y[1] && x[2] == y[2];
}

static __always_inline void count_access(struct thread_state *s, struct access_key *k, u64 n)
{
	send_access(s, k, n);
	if (s->run_count && same_key(&s->run_key, k)) {
		s->run_count += n;
		if (s->run_count >= RUN_FLUSH)
			flush_run(s);
		return;
	}
	flush_run(s);
	s->run_key = *k;
	s->run_count = n;
}

/* floor(log2(v)) for v > 0.  (BCC's bpf_log2l() is that plus one.) */
static __always_inline u32 floor_log2(u64 v)
{
	u32 r = 0;
	if (v >> 32) { v >>= 32; r += 32; }
	if (v >> 16) { v >>= 16; r += 16; }
	if (v >> 8) { v >>= 8; r += 8; }
	if (v >> 4) { v >>= 4; r += 4; }
	if (v >> 2) { v >>= 2; r += 2; }
	if (v >> 1) r += 1;
	return r;
}

/* The slot layout is documented in ioregtrace/histogram.py (slot_of). */
static __always_inline u32 hist_slot(u64 ns)
{
	if (ns < (1ULL << HIST_LOW_SHIFT))
		return ns >> (HIST_LOW_SHIFT - HIST_SUB_BITS);
	u32 e = floor_log2(ns);
	if (e > HIST_HIGH_SHIFT)
		return HIST_SLOTS - 1;
	u32 sub = (ns >> (e - HIST_SUB_BITS)) & ((1 << HIST_SUB_BITS) - 1);
	return ((e - HIST_LOW_SHIFT + 1) << HIST_SUB_BITS) + sub;
}

/* Put the thread's batched round trips into the latencies map. */
static __always_inline void flush_latency(struct thread_state *s)
{
	u32 n = s->lat_n;
	if (!n)
		return;
	s->lat_n = 0;
	struct latency *l = latencies.lookup(&s->lat_key);
	if (!l) {       /* a new key: start from the zeroed template */
		int zero_idx = 0;
		struct latency *zero = latency_zero.lookup(&zero_idx);
		if (zero)
			latencies.insert(&s->lat_key, zero);
		l = latencies.lookup(&s->lat_key);
		if (!l) {
			bump(CNT_DROPPED_LATENCY, n);
			return;
		}
	}
	__sync_fetch_and_add(&l->sum_ns, s->lat_sum);
#pragma clang loop unroll(disable)
	for (u32 i = 0; i < LATENCY_FLUSH; i++) {
		if (i >= n)
			break;
		u32 slot = s->lat_slot[i];
		__sync_fetch_and_add(&l->slots[slot & (HIST_ARRAY - 1)], 1);
	}
	/* Exact max under concurrent vCPUs: retry while someone else raised it. */
	u64 ns = s->lat_max, old = l->max_ns;
#pragma unroll
	for (int i = 0; i < 4 && old < ns; i++) {
		u64 seen = __sync_val_compare_and_swap(&l->max_ns, old, ns);
		if (seen == old)
			break;
		old = seen;
	}
}

#ifdef WITH_EXITS
#define EXIT_HW 0
#define EXIT_USER 1

struct exit_key {
	u32 tid;        /* the vCPU thread */
	u32 vm;         /* serial of its VMM process */
	u32 reason;
	u8 isa;         /* EXIT_HW: KVM_ISA_*; EXIT_USER: 0 */
	u8 kind;        /* EXIT_HW / EXIT_USER */
	u16 err;        /* EXIT_USER: errno of a failed KVM_RUN, else 0 */
};

struct exit_stats {     /* timed exits: the histogram's sum */
	u64 count;      /* every exit of the key */
	u64 to_user;    /* EXIT_HW: returned to the VMM before the next entry */
	u64 sum_ns;
	u64 min_ns;
	u64 max_ns;
	u64 slots[HIST_ARRAY];
};

/* 2 KiB a key; vCPUs x reasons seen, allocated as used. */
BPF_F_TABLE("hash", struct exit_key, struct exit_stats, exits, MAX_EXIT_KEYS,
	    BPF_F_NO_PREALLOC);
BPF_PERCPU_ARRAY(exit_zero, struct exit_stats, 1);

static __always_inline struct exit_stats *exit_stats_of(struct thread_state *s,
							 struct exit_batch *b)
{
	struct exit_key k = {.tid = (u32)bpf_get_current_pid_tgid(), .vm = s->vm,
			     .reason = b->reason, .isa = b->isa, .kind = b->kind,
			     .err = b->err};
	struct exit_stats *e = exits.lookup(&k);
	if (e)
		return e;
	int zero_idx = 0;
	struct exit_stats *zero = exit_zero.lookup(&zero_idx);
	if (zero)
		exits.insert(&k, zero);
	e = exits.lookup(&k);
	if (!e)
		bump(CNT_DROPPED_EXITS, b->n);
	return e;
}

/* The batch into the exits map.  Each key is written only by its own vCPU
 * thread (the tid is in it): no atomics. */
static __always_inline void flush_exit_batch(struct thread_state *s, struct exit_batch *b)
{
	u32 n = b->n;
	if (!n)
		return;
	struct exit_stats *e = exit_stats_of(s, b);
	b->n = 0;
	if (!e)
		return;
	e->count += n;
	e->to_user += b->to_user;
	if (!b->timed)
		return;
	e->sum_ns += b->sum_ns;
	if (b->max_ns > e->max_ns)
		e->max_ns = b->max_ns;
	if (!e->min_ns || b->min_ns < e->min_ns)
		e->min_ns = b->min_ns;
#pragma clang loop unroll(disable)
	for (u32 i = 0; i < EXIT_FLUSH; i++) {
		if (i >= b->timed)
			break;
		e->slots[b->slot[i] & (HIST_ARRAY - 1)]++;
	}
}

/* One exit into the thread's batch of its kind (`ns` when timed). */
static __always_inline void exit_batch_add(struct thread_state *s, struct exit_batch *b,
					   u8 kind, u8 isa, u32 reason, u16 err, u64 ns,
					   int timed, u32 to_user)
{
	if (b->n && (b->reason != reason || b->isa != isa || b->err != err))
		flush_exit_batch(s, b);
	if (!b->n) {
		b->reason = reason;
		b->isa = isa;
		b->err = err;
		b->kind = kind;
		b->to_user = b->timed = 0;
		b->sum_ns = b->min_ns = b->max_ns = 0;
	}
	b->n++;
	b->to_user += to_user;
	if (timed) {
		b->slot[b->timed & (EXIT_FLUSH - 1)] = hist_slot(ns);
		b->timed++;
		b->sum_ns += ns;
		if (ns > b->max_ns)
			b->max_ns = ns;
		if (!b->min_ns || ns < b->min_ns)
			b->min_ns = ns ? ns : 1;        /* 0 means "none yet" */
	}
	if (b->n >= EXIT_FLUSH)
		flush_exit_batch(s, b);
}

static __always_inline void flush_exit_batches(struct thread_state *s)
{
	flush_exit_batch(s, &s->hb);
	flush_exit_batch(s, &s->ub);
}
#else
#define flush_exit_batches(s) do { } while (0)
#endif /* WITH_EXITS */

/* Everything the thread holds back from the maps. */
static __always_inline void flush_batches(struct thread_state *s)
{
	flush_run(s);
	flush_latency(s);
	flush_exit_batches(s);
}

static __always_inline void record_latency(struct thread_state *s, struct access_key *k, u64 ns)
{
	send_latency(s, ns);
	if (s->lat_n && !same_key(&s->lat_key, k))
		flush_latency(s);
	if (!s->lat_n) {
		s->lat_key = *k;
		s->lat_sum = 0;
		s->lat_max = 0;
	}
	s->lat_slot[s->lat_n & (LATENCY_FLUSH - 1)] = hist_slot(ns);
	s->lat_sum += ns;
	if (ns > s->lat_max)
		s->lat_max = ns;
	if (++s->lat_n >= LATENCY_FLUSH)
		flush_latency(s);
}

static __always_inline u64 read_value(const void *ptr, u32 size)
{
	u64 v = 0;
	if (!ptr)
		return 0;
	switch (size) {
	case 1: { u8 b = 0; bpf_probe_read_kernel(&b, 1, ptr); v = b; break; }
	case 2: { u16 w = 0; bpf_probe_read_kernel(&w, 2, ptr); v = w; break; }
	case 4: { u32 d = 0; bpf_probe_read_kernel(&d, 4, ptr); v = d; break; }
	case 8: bpf_probe_read_kernel(&v, 8, ptr); break;
	}
	return v;
}

/* Which in-kernel handler serves a write, by the registrations this VM made
 * (the first match in kvm_io_bus order: ioeventfd before coalesced).  The
 * written value is read only when the answer depends on it (a datamatch
 * ioeventfd at that address): most writes skip the probe read. */
static __always_inline u8 classify_write(struct thread_state *s, u32 pid, u8 space,
					 u64 addr, u32 size, const void *valp)
{
	u32 gen = cfg(CFG_REG_GEN);
	u64 val = 0;
	if (s->cache_gen == gen && s->cache_addr == addr && s->cache_space == space &&
	    s->cache_size == size) {
		if (!s->cache_by_value)
			return s->cache_path;
		val = read_value(valp, size);
		if (s->cache_val == val)
			return s->cache_path;
	} else {
		val = read_value(valp, size);
	}

	u8 path = s->complete ? PATH_KERNEL : PATH_UNATTRIBUTED;
	u8 by_value = 0;
	struct reg_key rk = {.pid = pid, .vm = s->vm, .addr = addr, .space = space};
	struct ioeventfd_set *set = ioeventfds.lookup(&rk);
	if (set) {
#pragma clang loop unroll(disable)
		for (int i = 0; i < IOEVENTFD_SLOTS; i++) {
			struct ioeventfd_slot *e = &set->slot[i];
			if (!e->used || (e->len && e->len != size))
				continue;
			if (e->len && !e->wildcard) {
				by_value = 1;
				if (e->datamatch != val)
					continue;
			}
			path = PATH_IOEVENTFD;
			break;
		}
	}
	if (path != PATH_IOEVENTFD) {
		struct vm_key vk = {.pid = pid, .vm = s->vm};
		struct zone_set *zs = zones.lookup(&vk);
		if (zs) {
#pragma clang loop unroll(disable)
			for (int i = 0; i < ZONE_SLOTS; i++) {
				struct zone *z = &zs->zone[i];
				if (z->used && z->pio == space && addr >= z->addr &&
				    addr + size <= z->addr + z->size) {
					path = PATH_COALESCED;
					break;
				}
			}
		}
	}
	s->cache_gen = gen;
	s->cache_addr = addr;
	s->cache_val = val;
	s->cache_space = space;
	s->cache_size = size;
	s->cache_path = path;
	s->cache_by_value = by_value;
	return path;
}

/* The pending access was not followed by its exit: kvm.ko served it. */
static __always_inline void settle_in_kernel(struct thread_state *s)
{
	if (!s->pending)
		return;
	s->pending = 0;
	count_access(s, &s->pend_key, s->pend_count);
}

/* Who an access key names: the VMM process, or with PER_VCPU (--per-vcpu)
 * the vCPU thread itself (the process is known from the key's vm serial).
 * Every key is made in the vCPU thread's own context. */
static __always_inline u32 key_pid(u32 pid)
{
#ifdef PER_VCPU
	return (u32)bpf_get_current_pid_tgid();
#else
	return pid;
#endif
}

static __always_inline void set_pending(struct thread_state *s, u32 pid, u8 space,
					u64 addr, u32 size, u8 op, u8 path, u32 count)
{
	s->pending = 1;
	s->pend_late = s->closing;
	s->pend_count = count;
	s->pend_key.pid = key_pid(pid);
	s->pend_key.vm = s->vm;
	s->pend_key.addr = addr;
	s->pend_key.space = space;
	s->pend_key.op = op;
	s->pend_key.path = path;
	s->pend_key.size = size;
	s->pend_key.layout = layout_now(s);
}

static __always_inline void count_now(struct thread_state *s, u32 pid, u8 space,
				      u64 addr, u32 size, u8 op, u8 path, u64 n)
{
	struct access_key k = {.pid = key_pid(pid), .vm = s->vm, .addr = addr, .space = space,
			       .op = op, .path = path, .size = size,
			       .layout = layout_now(s)};
	count_access(s, &k, n);
#ifdef HAVE_KVM_EXIT
	/* an access served in the kernel: its exit's handling time is its
	 * cost, known at kvm_entry */
	s->kx_key = k;
	s->kx_valid = 1;
#endif
}

/* A read the kernel reports as done.  Returns 1 when it must not be counted
 * as a kernel access. */
static __always_inline int suspect_first_read(struct thread_state *s)
{
	if (!s->synced && s->fresh_entry) {
		/* Attached while this thread was between an exit and its
		 * re-entry: this may be the completion of a userspace read we
		 * never saw leave, or a real kernel read.  Say so, not guess. */
		bump(CNT_ATTACH_AMBIGUOUS, 1);
		return 1;
	}
	return 0;
}


/* TP_PROTO(int type, int len, u64 gpa, void *val) */
RAW_TRACEPOINT_PROBE(kvm_mmio)
{
	struct thread_state *s = thread();
	if (!s || !s->traced)
		return 0;
	u32 pid = s->pid;
	u32 type = ctx->args[0];
	u32 len = ctx->args[1];
	u64 gpa = ctx->args[2];

	settle_in_kernel(s);
	if (type == KVM_TRACE_MMIO_WRITE) {
		u8 path = classify_write(s, pid, SPACE_MMIO, gpa, len, (const void *)ctx->args[3]);
		set_pending(s, pid, SPACE_MMIO, gpa, len, OP_WRITE, path, 1);
	} else if (type == KVM_TRACE_MMIO_READ_UNSATISFIED) {
		/* kvm.ko found no handler; the exit that follows confirms it,
		 * or kvm_ioregion_send takes it for an ioregion.  (Not again
		 * for a read already sent and awaiting its completion.) */
		if (!s->await_mmio_read || s->await_addr != gpa)
			set_pending(s, pid, SPACE_MMIO, gpa, len, OP_READ, PATH_KERNEL, 1);
	} else if (s->await_mmio_read && s->await_addr == gpa) {
		s->await_mmio_read = 0;          /* completion of a userspace read */
	} else if (!suspect_first_read(s)) {
		count_now(s, pid, SPACE_MMIO, gpa, len, OP_READ, PATH_KERNEL, 1);
	}
	s->fresh_entry = 0;
	return 0;
}

/* TP_PROTO(unsigned int rw, unsigned int port, unsigned int size,
 *          unsigned int count, const void *data); rw: 0 = IN, 1 = OUT.
 * String PIO (count > 1) counts each element as one access. */
RAW_TRACEPOINT_PROBE(kvm_pio)
{
	struct thread_state *s = thread();
	if (!s || !s->traced)
		return 0;
	u32 pid = s->pid;
	u32 rw = ctx->args[0];
	u32 port = ctx->args[1];
	u32 size = ctx->args[2];
	u32 count = ctx->args[3];

	settle_in_kernel(s);
	if (rw) {
		u8 path = classify_write(s, pid, SPACE_PIO, port, size, (const void *)ctx->args[4]);
		set_pending(s, pid, SPACE_PIO, port, size, OP_WRITE, path, count);
	} else if (s->skip_pio_in) {
		s->skip_pio_in = 0;              /* completion of a counted IN */
	} else if (s->await_pio_in) {
		struct access_key k = {.pid = key_pid(pid), .vm = s->vm, .addr = port,
				       .space = SPACE_PIO, .op = OP_READ,
				       .path = PATH_USERSPACE, .size = size,
				       .layout = layout_now(s)};
		s->await_pio_in = 0;
		count_access(s, &k, count);
		record_latency(s, &k, s->pio_in_ns);
	} else if (!suspect_first_read(s)) {
		count_now(s, pid, SPACE_PIO, port, size, OP_READ, PATH_KERNEL, count);
	}
	s->fresh_entry = 0;
	return 0;
}

#ifdef HAVE_KVM_FAST_MMIO
/* TP_PROTO(u64 gpa): VMX only.  A write to a zero-length ioeventfd, caught
 * on the EPT-misconfig fast path without a kvm_mmio event. */
RAW_TRACEPOINT_PROBE(kvm_fast_mmio)
{
	struct thread_state *s = thread();
	if (!s || !s->traced)
		return 0;
	u32 pid = s->pid;
	settle_in_kernel(s);
	count_now(s, pid, SPACE_MMIO, ctx->args[0], 0, OP_WRITE, PATH_IOEVENTFD, 1);
	s->fresh_entry = 0;
	return 0;
}
#endif

#ifdef HAVE_KVM_IOREGION
/* ioregionfd (kernel/ patches; KVM_SET_IOREGION): kvm.ko sends the access
 * to a device task over a socket and, unless it is a posted write, waits
 * for the response, all on the vCPU thread without leaving KVM_RUN.
 *
 * TP_PROTO(bool pio, u64 addr, u32 len, bool write, bool posted,
 *          u64 user_data, u64 data) */
RAW_TRACEPOINT_PROBE(kvm_ioregion_send)
{
	struct thread_state *s = thread();
	if (!s || !s->traced)
		return 0;
	u8 space = ctx->args[0] ? SPACE_PIO : SPACE_MMIO;
	u64 addr = ctx->args[1];
	u8 op = ctx->args[3] ? OP_WRITE : OP_READ;

	/* A write's kvm_mmio/kvm_pio event (or an MMIO read's
	 * READ_UNSATISFIED) came first and is pending: it is this access,
	 * even across a return to userspace before it was sent (see on_exit).
	 * A string OUT's elements are sent one by one. */
	if (s->pending && s->pend_key.addr == addr && s->pend_key.space == space &&
	    s->pend_key.op == op) {
		if (--s->pend_count == 0)
			s->pending = 0;
	} else {
		settle_in_kernel(s);
	}
	struct access_key k = {.pid = key_pid(s->pid), .vm = s->vm, .addr = addr, .space = space,
			       .op = op, .path = PATH_IOREGIONFD, .size = ctx->args[2],
			       .layout = layout_now(s)};
	count_access(s, &k, 1);
	if (op == OP_READ) {
		/* its kvm_mmio READ / kvm_pio IN comes after the response */
		if (space == SPACE_PIO) {
			s->skip_pio_in = 1;
		} else {
			s->await_mmio_read = 1;
			s->await_addr = addr;
		}
	}
	if (ctx->args[4]) {             /* posted: no response, no round trip */
		s->ioregion_ts = 0;
#ifdef WITH_EVENTS
		s->event_sent = 0;
#endif
	} else {
		s->ioregion_ts = bpf_ktime_get_ns();
		s->ioregion_key = k;
	}
	s->fresh_entry = 0;
	return 0;
}

/* TP_PROTO(bool pio, u64 addr, u32 len, bool write, u64 user_data,
 *          u64 data, int result).  The ioregionfd latency is from the
 * command sent to its response received: the device task's whole turn, as
 * the vCPU waits for it (including any time the vCPU spent back in the VMM
 * after a signal interrupted the wait).  A failed exchange (result -EIO)
 * ends the round trip too. */
RAW_TRACEPOINT_PROBE(kvm_ioregion_response)
{
	struct thread_state *s = thread();
	if (!s || !s->traced || !s->ioregion_ts || s->ioregion_key.addr != ctx->args[1])
		return 0;
	record_latency(s, &s->ioregion_key, bpf_ktime_get_ns() - s->ioregion_ts);
	s->ioregion_ts = 0;
	return 0;
}
#endif

/* The head of the vCPU's kvm_run, as KVM left it for this exit.  Returns 0
 * when it cannot be read (mapping unknown: a VM attached to mid-way, or a
 * VMM that reads kvm_run some other way). */
static __always_inline int read_run(struct thread_state *s, struct kvm_run_head *run)
{
	return s->run_addr && !read_user(run, sizeof(*run), (void *)s->run_addr);
}

/* The access an MMIO/IO exit is for, from the vCPU's kvm_run; 0 when it
 * cannot be read. */
static __always_inline int decode_exit(struct thread_state *s, u32 reason,
				       struct access_key *k, u32 *count)
{
	struct kvm_run_head run;
	if (!read_run(s, &run) || run.exit_reason != reason)
		return 0;
	if (reason == KVM_EXIT_IO) {
		k->space = SPACE_PIO;
		k->addr = run.io.port;
		k->size = run.io.size;
		k->op = run.io.direction ? OP_WRITE : OP_READ;
		*count = run.io.count;
	} else {
		k->space = SPACE_MMIO;
		k->addr = run.mmio.phys_addr;
		k->size = run.mmio.len;
		k->op = run.mmio.is_write ? OP_WRITE : OP_READ;
		*count = 1;
	}
	return 1;
}

/* The pending access went out to userspace. */
static __always_inline void exit_pending(struct thread_state *s)
{
	s->pending = 0;
	s->pend_key.path = PATH_USERSPACE;
	count_access(s, &s->pend_key, s->pend_count);
	s->exit_key = s->pend_key;
	s->exit_kind = EXIT_KEYED;
	if (s->pend_key.space == SPACE_MMIO && s->pend_key.op == OP_READ) {
		s->await_mmio_read = 1;
		s->await_addr = s->pend_key.addr;
	}
	s->synced = 1;
}

/* An exit to userspace for the access `k` (decoded from kvm_run). */
static __always_inline void exit_decoded(struct thread_state *s, u32 pid,
					 struct access_key *k, u32 count)
{
	if (s->pending && s->pend_key.space == k->space && s->pend_key.addr == k->addr &&
	    s->pend_key.op == k->op) {
		exit_pending(s);       /* the traced access itself (count: string PIO) */
		return;
	}
	/* Whatever was pending stayed in the kernel; this exit is another
	 * access, one that emits no event before exiting. */
	settle_in_kernel(s);
	if (k->space == SPACE_PIO && k->op == OP_READ && s->synced) {
		/* A PIO IN: count it now; its kvm_pio comes with the data on
		 * re-entry and is only a completion. */
		k->pid = key_pid(pid);
		k->vm = s->vm;
		k->path = PATH_USERSPACE;
		k->layout = layout_now(s);
		count_access(s, k, count);
		s->exit_key = *k;
		s->exit_kind = EXIT_KEYED;
		s->skip_pio_in = 1;
		return;
	}
	/* The second half of an access KVM split in two, or (on a thread not
	 * yet synced) an access begun before attach.  The thread stays
	 * unsynced, so a read completing this exit is reported as ambiguous,
	 * not as a kernel read. */
	s->exit_kind = EXIT_NONE;
	bump(CNT_UNMATCHED_EXITS, 1);
}

/* Without kvm_run: the exit is for the pending access if the bus matches;
 * an IO exit with nothing pending can only be an IN. */
static __always_inline void exit_inferred(struct thread_state *s, u8 space, u32 reason)
{
	bump(CNT_INFERRED_EXITS, 1);
	if (s->pending && s->pend_key.space == space) {
		exit_pending(s);
		return;
	}
	settle_in_kernel(s);
	if (reason == KVM_EXIT_IO && s->synced) {
		s->exit_kind = EXIT_PIO_IN;
	} else {
		s->exit_kind = EXIT_NONE;
		bump(CNT_UNMATCHED_EXITS, 1);
	}
}

#ifdef HAVE_KVM_IOREGION
/* May KVM_RUN have returned with an ioregion access unfinished
 * (KVM_RUN_X86_IOREGIONFD_PENDING in kvm_run.flags)?  Yes too when kvm_run
 * cannot be read: until the VMM first touches its mapping the page is not
 * in its page tables, and a tracepoint program cannot fault it in.  An
 * access kept pending wrongly is only counted later: the thread's next
 * event settles it where it was served. */
static __always_inline int ioregion_may_be_pending(struct thread_state *s)
{
	struct kvm_run_head run;
	return !read_run(s, &run) || (run.flags & KVM_RUN_X86_IOREGIONFD_PENDING);
}

/* KVM_EXIT_IOREGIONFD_FAILED: an ioregion's channel failed.  If the access
 * was sent first, kvm_ioregion_send counted it; otherwise (the channel had
 * failed already) it is the pending access, or, for an IN, which emits no
 * event before its exit, the one kvm_run names.  Either way it completes
 * on re-entry (reads as all ones) without another exit: a completion, not
 * a new access. */
static __always_inline void exit_ioregion_failed(struct thread_state *s)
{
	if (s->pending) {
		s->pending = 0;
		s->pend_key.path = PATH_IOREGIONFD;
		count_access(s, &s->pend_key, s->pend_count);
		if (s->pend_key.space == SPACE_MMIO && s->pend_key.op == OP_READ) {
			s->await_mmio_read = 1;
			s->await_addr = s->pend_key.addr;
		}
		return;
	}
	struct kvm_run_head run;
	if (s->skip_pio_in)
		return;
	if (!read_run(s, &run)) {
		/* an IN we cannot name (kvm_run not yet touched by the VMM) */
		bump(CNT_UNMATCHED_EXITS, 1);
		return;
	}
	if (run.exit_reason != KVM_EXIT_IOREGIONFD_FAILED ||
	    !run.ioregionfd_failed.pio || run.ioregionfd_failed.is_write)
		return;
	struct access_key k = {.pid = key_pid(s->pid), .vm = s->vm,
			       .addr = run.ioregionfd_failed.addr,
			       .space = SPACE_PIO, .op = OP_READ, .path = PATH_IOREGIONFD,
			       .size = run.ioregionfd_failed.len, .layout = layout_now(s)};
	count_access(s, &k, 1);
	s->skip_pio_in = 1;
}
#endif

/* TP_PROTO(__u32 reason, int errno): the end of every KVM_RUN. */
static __always_inline void on_exit(struct thread_state *s, u32 reason, int err)
{
	if (err == 0 && (reason == KVM_EXIT_MMIO || reason == KVM_EXIT_IO)) {
		struct access_key k = {};
		u32 count = 1;
		s->exit_ts = bpf_ktime_get_ns();
		if (reason == KVM_EXIT_MMIO && s->pending && s->pend_key.space == SPACE_MMIO)
			/* An MMIO exit always follows its own kvm_mmio event
			 * (WRITE, or READ_UNSATISFIED): no need to read kvm_run.
			 * Only an IO exit can be for an access with no event (an
			 * IN) while another one (an in-kernel OUT) is pending. */
			exit_pending(s);
		else if (decode_exit(s, reason, &k, &count))
			exit_decoded(s, s->pid, &k, count);
		else
			exit_inferred(s, reason == KVM_EXIT_MMIO ? SPACE_MMIO : SPACE_PIO, reason);
		return;
	}
#ifdef HAVE_KVM_IOREGION
	if ((err == 0 && reason == KVM_EXIT_IOREGIONFD_FAILED) ||
	    (err != 0 && s->pending && ioregion_may_be_pending(s))) {
		if (err == 0)
			exit_ioregion_failed(s);
		/* else: a signal before an ioregion access was sent; it stays
		 * pending, and kvm_ioregion_send takes it on re-entry */
		s->exit_kind = EXIT_NONE;
		s->synced = 1;
		return;
	}
#endif
	settle_in_kernel(s);
	s->exit_kind = EXIT_NONE;
	s->synced = 1;
}

/* ---- Exits by reason (WITH_EXITS; off with --no-exits) ------------------
 * Two kinds of key, both per vCPU thread:
 *  - EXIT_HW: every VM exit kvm.ko reports (kvm:kvm_exit, VMX and SVM; it
 *    does not fire on every backend, e.g. PVM), by ISA and exit reason
 *    (VMX: the full exit reason, basic reason in its low 16 bits; SVM: the
 *    exit code).  Timed from kvm_exit to the next kvm_entry on the same
 *    thread: kvm.ko's handling of it, when it stayed in the kernel.  An
 *    exit that returned to userspace first is counted (to_user) but not
 *    timed: its time is the VMM's, under its EXIT_USER key.
 *  - EXIT_USER: every return from KVM_RUN, by kvm_run.exit_reason (and the
 *    errno when KVM_RUN failed), timed from kvm_userspace_exit to the
 *    thread's next KVM_RUN call: the VMM's round trip.
 * Each key is written only by its own vCPU thread (the tid is in it), so
 * the updates need no atomics.  An exit is counted when it ends (entry, or
 * next KVM_RUN), into the thread's batch of its kind (struct exit_batch:
 * up to EXIT_FLUSH exits of one reason per map update), which goes to the
 * map when the reason changes, when it is full, at every KVM_RUN return
 * other than an MMIO/IO exit, and at thread exit (flush_exits).  The agent
 * adds the batches and the exits still open at the end from the thread's
 * state (probes.py, _add_open_exits). */
#ifdef WITH_EXITS
/* The open hardware exit went to userspace: counted, not timed. */
static __always_inline void hw_exit_untimed(struct thread_state *s, u32 to_user)
{
	s->hx_ts = 0;
	exit_batch_add(s, &s->hb, EXIT_HW, s->hx_isa, s->hx_reason, 0, 0, 0, to_user);
}

static __always_inline void user_exit_end(struct thread_state *s, int timed)
{
	u64 ns = timed ? bpf_ktime_get_ns() - s->ux_ts : 0;
	s->ux_ts = 0;
	exit_batch_add(s, &s->ub, EXIT_USER, 0, s->ux_reason, s->ux_err, ns, timed, 0);
}

/* At kvm_userspace_exit: the hardware exit that led here, and the start
 * of the VMM's round trip. */
static __always_inline void on_user_exit(struct thread_state *s, u32 reason, int err)
{
	if (s->hx_ts)
		hw_exit_untimed(s, 1);
	if (s->ux_ts)           /* a return whose next KVM_RUN we did not see */
		user_exit_end(s, 0);
	s->ux_reason = reason;
	s->ux_err = err < 0 ? -err : err;
	s->ux_ts = bpf_ktime_get_ns();
}

/* The thread exits: what is still open is counted, untimed. */
static __always_inline void flush_exits(struct thread_state *s)
{
	if (s->hx_ts)
		hw_exit_untimed(s, 0);
	if (s->ux_ts)
		user_exit_end(s, 0);
	flush_exit_batches(s);
}

#ifdef HAVE_KVM_EXIT
/* The regular tracepoint, not the raw one: only it has the exit reason
 * (kvm.ko asks the vendor module for it while filling the event). */
TRACEPOINT_PROBE(kvm, kvm_exit)
{
	struct thread_state *s = thread();
	if (!s || !s->traced)
		return KEEP_EVENT;
	if (s->hx_ts)           /* an exit with no entry after it (none seen) */
		hw_exit_untimed(s, 0);
	s->kx_valid = 0;
	s->hx_reason = args->exit_reason;
	s->hx_isa = args->isa;
	s->hx_ts = bpf_ktime_get_ns();
	return KEEP_EVENT;
}

/* TP_PROTO(struct kvm_vcpu *vcpu, bool force_immediate_exit): the raw
 * tracepoint, nothing of the event is needed but the time.  The interval
 * timed is kvm_exit -> this kvm_entry on the same thread: kvm.ko's own
 * handling of the exit (including a halted vCPU's wait), with no return
 * to the VMM in between. */
RAW_TRACEPOINT_PROBE(kvm_entry)
{
	struct thread_state *s = thread_find(bpf_get_current_pid_tgid());
	if (!s || !s->hx_ts)
		return 0;
	/* its kvm_exit may have come before the end and this entry after */
	if (session_closed(s))
		return 0;
	u64 ns = bpf_ktime_get_ns() - s->hx_ts;
	s->hx_ts = 0;
	exit_batch_add(s, &s->hb, EXIT_HW, s->hx_isa, s->hx_reason, 0, ns, 1, 0);
	/* The device access this exit carried, if kvm.ko served it (kernel,
	 * ioeventfd, coalesced): the guest is re-entered with no return to
	 * the VMM, so a pending one is settled in the kernel here, and the
	 * exit's handling time is its latency, in its own row. */
	if (s->pending && s->traced) {
		s->kx_key = s->pend_key;
		s->kx_valid = 1;
		settle_in_kernel(s);
	}
	if (s->kx_valid) {
		s->kx_valid = 0;
		record_latency(s, &s->kx_key, ns);
	}
	return 0;
}
#endif /* HAVE_KVM_EXIT */
#else
#define on_user_exit(s, reason, err) do { } while (0)
#define flush_exits(s) do { } while (0)
#endif /* WITH_EXITS */

RAW_TRACEPOINT_PROBE(kvm_userspace_exit)
{
	struct thread_state *s = thread();
	if (!s || !s->traced)
		return 0;
	u32 reason = ctx->args[0];
	int err = ctx->args[1];
	on_exit(s, reason, err);
	on_user_exit(s, reason, err);
	/* An MMIO/IO exit is handled and the guest goes on: keep batching.
	 * Any other return (HLT, a signal, a pause, an error) may be the last
	 * for a while: make the maps complete. */
	if (err != 0 || (reason != KVM_EXIT_MMIO && reason != KVM_EXIT_IO))
		flush_batches(s);
	return 0;
}

static __always_inline void on_kvm_run(struct thread_state *s, u32 pid, u32 fd)
{
	/* A vCPU thread runs one vCPU fd; its kvm_run stays where it is. */
	if (!s->run_addr || s->run_fd != fd) {
		struct fd_key fk = {.pid = pid, .fd = fd};
		u64 *run = vcpu_runs.lookup(&fk);
		s->run_addr = run ? *run : 0;
		s->run_fd = fd;
	}

	/* Userspace dispatch latency, per access: from kvm_userspace_exit to
	 * the next KVM_RUN call on the same thread, i.e. the time the VMM took
	 * to handle the exit (including any wait for a device thread). */
	if (s->exit_kind == EXIT_KEYED) {
		record_latency(s, &s->exit_key, bpf_ktime_get_ns() - s->exit_ts);
	} else if (s->exit_kind == EXIT_PIO_IN) {
		s->pio_in_ns = bpf_ktime_get_ns() - s->exit_ts;
		s->await_pio_in = 1;
	}
	s->exit_kind = EXIT_NONE;
	s->fresh_entry = 1;
#ifdef WITH_EXITS
	/* The VMM's round trip for the last KVM_RUN return, by its reason:
	 * kvm_userspace_exit -> this KVM_RUN call on the same thread. */
	if (s->ux_ts)
		user_exit_end(s, 1);
#endif
}

static __always_inline void bump_reg_gen(void)
{
	int idx = CFG_REG_GEN;
	u64 *g = config.lookup(&idx);
	if (g)
		__sync_fetch_and_add(g, 1);
}

static __always_inline void remember(u32 pid, u32 vm, u8 kind, u8 space, u64 addr,
				     u32 size)
{
	struct reg_record r = {.pid = pid, .vm = vm, .addr = addr, .size = size,
			       .space = space, .kind = kind};
	u8 one = 1;
	reg_history.update(&r, &one);
}

static __always_inline void apply_ioeventfd(struct thread_state *s, u32 pid,
					    struct ioctl_ioeventfd *a)
{
	struct reg_key rk = {.pid = pid, .vm = s->vm, .addr = a->addr,
			     .space = (a->flags & KVM_IOEVENTFD_FLAG_PIO) ? SPACE_PIO : SPACE_MMIO};
	u8 wildcard = !(a->flags & KVM_IOEVENTFD_FLAG_DATAMATCH);
	struct ioeventfd_set *set;
	int zero_idx = 0;

	if (a->flags & KVM_IOEVENTFD_FLAG_DEASSIGN) {
		/* KVM's own match: bus, addr, len, wildcard, datamatch (its
		 * collision check makes that unique). */
		set = ioeventfds.lookup(&rk);
		if (!set)
			return;
#pragma clang loop unroll(disable)
		for (int i = 0; i < IOEVENTFD_SLOTS; i++) {
			struct ioeventfd_slot *e = &set->slot[i];
			if (e->used && e->len == a->len && e->wildcard == wildcard &&
			    (wildcard || e->datamatch == a->datamatch)) {
				e->used = 0;
				break;
			}
		}
		bump_reg_gen();
		return;
	}
	struct ioeventfd_set *empty = ioeventfd_zero.lookup(&zero_idx);
	if (!empty)
		return;
	set = ioeventfds.lookup_or_try_init(&rk, empty);
	if (!set) {
		bump(CNT_DROPPED_REGISTRATIONS, 1);
		return;
	}
#pragma clang loop unroll(disable)
	for (int i = 0; i < IOEVENTFD_SLOTS; i++) {
		struct ioeventfd_slot *e = &set->slot[i];
		if (!e->used) {
			e->datamatch = a->datamatch;
			e->len = a->len;
			e->wildcard = wildcard;
			e->used = 1;
			bump_reg_gen();
			remember(pid, s->vm, REG_IOEVENTFD, rk.space, a->addr, a->len);
			return;
		}
	}
	bump(CNT_DROPPED_REGISTRATIONS, 1);
}

static __always_inline void apply_zone(struct thread_state *s, u32 pid, int add,
				       struct ioctl_zone *a)
{
	struct vm_key vk = {.pid = pid, .vm = s->vm};
	int zero_idx = 0;
	struct zone_set *empty = zone_zero.lookup(&zero_idx);
	if (!empty)
		return;
	struct zone_set *zs = add ? zones.lookup_or_try_init(&vk, empty) : zones.lookup(&vk);
	if (!zs) {
		if (add)
			bump(CNT_DROPPED_REGISTRATIONS, 1);
		return;
	}
	u8 pio = a->pio ? 1 : 0;
	int placed = 0;
#pragma clang loop unroll(disable)
	for (int i = 0; i < ZONE_SLOTS; i++) {
		struct zone *z = &zs->zone[i];
		if (add) {
			if (!z->used && !placed) {
				z->addr = a->addr;
				z->size = a->size;
				z->pio = pio;
				z->used = 1;
				placed = 1;
			}
		} else if (z->used && z->pio == pio && a->addr >= z->addr &&
			   a->addr + a->size <= z->addr + z->size) {
			/* As KVM's coalesced_mmio_in_range(zone, addr, size):
			 * every zone that contains the given range goes. */
			z->used = 0;
		}
	}
	if (add && !placed)
		bump(CNT_DROPPED_REGISTRATIONS, 1);
	if (placed)
		remember(pid, s->vm, REG_ZONE, pio ? SPACE_PIO : SPACE_MMIO, a->addr, a->size);
	bump_reg_gen();
}

/* Registrations are applied as they are made, from the ioctl's argument:
 * its result is not read.  Reading it takes a sys_exit_ioctl program, and
 * with one attached every ioctl on the host (every KVM_RUN among them) pays
 * the syscall tracepoint's exit path, ~200 ns here.  A registration KVM
 * refuses (a VMM bug, or a full bus) is still counted as made; see the
 * README's Limits.  The ioctl numbers are KVM's (type 0xAE); another driver
 * answering them would have to accept the same argument layout, which none
 * does. */
TRACEPOINT_PROBE(syscalls, sys_enter_ioctl)
{
	u32 cmd = args->cmd;
	if (cmd != KVM_RUN && cmd != KVM_IOEVENTFD && cmd != KVM_CREATE_VM &&
	    cmd != KVM_CREATE_VCPU && cmd != KVM_REGISTER_COALESCED_MMIO &&
#ifdef HAVE_KVM_IOREGION
	    cmd != KVM_SET_IOREGION &&
#endif
	    cmd != KVM_UNREGISTER_COALESCED_MMIO)
		return KEEP_EVENT;
	struct thread_state *s = thread();
	if (!s)
		return KEEP_EVENT;
	if (cmd == KVM_RUN) {
		on_kvm_run(s, s->pid, args->fd);
		return KEEP_EVENT;
	}
	if (!s->watched)
		return KEEP_EVENT;
	u32 pid = s->pid;
	if (cmd == KVM_CREATE_VM) {
		struct vm_info *vi = vm_of(pid);
		if (vi)
			vi->complete = vi->created = 1;
		bump_state_gen();
		refresh(s, pid);
	} else if (cmd == KVM_CREATE_VCPU) {
		s->vcpu_created = 1;
	} else if (cmd == KVM_IOEVENTFD) {
		struct ioctl_ioeventfd a = {};
		read_user(&a, sizeof(a), (void *)args->arg);
		apply_ioeventfd(s, pid, &a);
#ifdef HAVE_KVM_IOREGION
	} else if (cmd == KVM_SET_IOREGION) {
		struct ioctl_ioregion a = {};
		read_user(&a, sizeof(a), (void *)args->arg);
		if (!(a.flags & KVM_IOREGION_DEASSIGN))
			remember(pid, s->vm, REG_IOREGION,
				 (a.flags & KVM_IOREGION_PIO) ? SPACE_PIO : SPACE_MMIO,
				 a.guest_paddr, a.memory_size);
#endif
	} else {
		struct ioctl_zone a = {};
		read_user(&a, sizeof(a), (void *)args->arg);
		apply_zone(s, pid, cmd == KVM_REGISTER_COALESCED_MMIO, &a);
	}
	return KEEP_EVENT;
}

/* ---- QEMU memory-map mirror ---------------------------------------------
 * A uprobe on QEMU's flatview_add_to_dispatch(FlatView *, MemoryRegionSection *),
 * which QEMU calls for every section of every flat view it builds, i.e. at
 * each real change of its memory map, before the new view is used.  So the
 * agent sees every layout QEMU ever dispatched with, in order, with no
 * polling; each access carries the generation that served it.
 *
 * struct MemoryRegionSection (include/exec/memory.h, unchanged since 2.12):
 *   Int128 size; MemoryRegion *mr; FlatView *fv; hwaddr offset_within_region;
 *   hwaddr offset_within_address_space; bool readonly; ...
 * struct FlatView: struct rcu_head (16 bytes); unsigned ref; FlatRange *ranges;
 *   unsigned nr, nr_allocated; AddressSpaceDispatch *dispatch; MemoryRegion *root;
 * MemoryRegion.name's offset is read off memory_region_name() by the agent.
 * The agent checks the mirror against QEMU's own `info mtree -f`. */
#define SECTION_SIZE 0
#define SECTION_MR 16
#define SECTION_FV 24
#define SECTION_OFFSET_IN_MR 32
#define SECTION_OFFSET_IN_AS 40
#define SECTION_READONLY 48
#define FLATVIEW_ROOT 48
#define UPROBE_ARG2(ctx) (((u64 *)(ctx))[13])   /* pt_regs->si on x86-64 */

#ifdef WITH_QEMU_MIRROR     /* compiled only when a QEMU may be traced */

static __always_inline u64 user_u64(u64 addr)
{
	u64 v = 0;
	read_user(&v, sizeof(v), (void *)addr);
	return v;
}

int qemu_flatview_section(void *ctx)
{
	struct thread_state *s = thread();
	if (!s || !s->watched)
		return 0;
	u64 name_off = cfg(CFG_MR_NAME_OFFSET);
	u64 section = UPROBE_ARG2(ctx);
	u64 fv = user_u64(section + SECTION_FV);
	u64 root = user_u64(fv + FLATVIEW_ROOT);
	char root_name[8] = {};
	read_user_str(root_name, sizeof(root_name), (void *)user_u64(root + name_off));
	u8 space;
	if (root_name[0] == 's' && root_name[1] == 'y' && root_name[2] == 's' &&
	    root_name[3] == 't' && root_name[4] == 'e' && root_name[5] == 'm' && !root_name[6])
		space = SPACE_MMIO;
	else if (root_name[0] == 'i' && root_name[1] == 'o' && !root_name[2])
		space = SPACE_PIO;
	else
		return 0;       /* a bus-master or other address space */

	int idx = s->vm & (MAX_VMS - 1);
	struct vm_layout *l = layouts.lookup(&idx);
	if (!l)
		return 0;
	if (l->vm != s->vm) {
		l->vm = s->vm;
		l->gen = 0;
		l->fv[0] = l->fv[1] = 0;
	}
	/* QEMU builds views under its big lock: one thread at a time. */
	if (l->fv[space & 1] != fv) {
		l->fv[space & 1] = fv;
		l->gen++;
	}

	struct layout_event *e = layout_events.ringbuf_reserve(sizeof(*e));
	if (!e) {
		bump(CNT_LOST_LAYOUT, 1);
		return 0;
	}
	e->pid = bpf_get_current_pid_tgid() >> 32;
	e->vm = s->vm;
	e->gen = l->gen;
	e->space = space;
	e->pad = 0;
	e->fv = fv;
	e->mr = user_u64(section + SECTION_MR);
	e->start = user_u64(section + SECTION_OFFSET_IN_AS);
	e->size = user_u64(section + SECTION_SIZE);
	if (user_u64(section + SECTION_SIZE + 8))
		e->size = 0;    /* the whole 64-bit space */
	e->offset = user_u64(section + SECTION_OFFSET_IN_MR);
	e->readonly = 0;
	read_user(&e->readonly, 1, (void *)(section + SECTION_READONLY));
	e->name[0] = 0;
	read_user_str(e->name, sizeof(e->name), (void *)user_u64(e->mr + name_off));
	layout_events.ringbuf_submit(e, RING_SUBMIT_FLAGS);
	return 0;
}
#endif /* WITH_QEMU_MIRROR */

/* Where a vCPU's struct kvm_run is mapped.  VMMs map it right after
 * creating the vCPU, on the same thread (QEMU's kvm_init_vcpu, rust-vmm's
 * create_vcpu, the demo), so the next mmap of an fd at offset 0 with the
 * vCPU mmap size is that.  A later mmap of a known vCPU fd is followed too. */
TRACEPOINT_PROBE(syscalls, sys_enter_mmap)
{
	if (args->off != 0 || (long)args->fd < 0)
		return KEEP_EVENT;
	struct thread_state *s = thread_find(bpf_get_current_pid_tgid());
	if (!s)
		return KEEP_EVENT;
	u64 size = cfg(CFG_VCPU_MMAP_SIZE);
	if (s->vcpu_created && (!size || args->len == size)) {
		s->vcpu_created = 0;
	} else {
		struct fd_key fk = {.pid = s->pid, .fd = args->fd};
		if (!vcpu_runs.lookup(&fk))
			return KEEP_EVENT;
	}
	s->mmap_vcpu = 1;
	s->mmap_fd = args->fd;
	return KEEP_EVENT;
}

TRACEPOINT_PROBE(syscalls, sys_exit_mmap)
{
	struct thread_state *s = thread_find(bpf_get_current_pid_tgid());
	if (!s || !s->mmap_vcpu)
		return KEEP_EVENT;
	s->mmap_vcpu = 0;
	if (args->ret < 0 && args->ret > -4096)
		return KEEP_EVENT;
	struct fd_key fk = {.pid = s->pid, .fd = s->mmap_fd};
	u64 addr = args->ret;
	vcpu_runs.update(&fk, &addr);
	return KEEP_EVENT;
}

/* With -p or -- CMD, children of traced processes are traced too (a VMM
 * started by a wrapper script).  Thread ids land here as well; they are
 * removed again when the thread exits. */
TRACEPOINT_PROBE(sched, sched_process_fork)
{
	if (cfg(CFG_MODE) != MODE_TARGETS)
		return KEEP_EVENT;
	u32 parent = bpf_get_current_pid_tgid() >> 32;
	if (!targets.lookup(&parent))
		return KEEP_EVENT;
	u32 child = args->child_pid;
	u8 one = 1;
	targets.update(&child, &one);
	return KEEP_EVENT;
}

TRACEPOINT_PROBE(sched, sched_process_exit)
{
	u64 id = bpf_get_current_pid_tgid();
	u32 tid = id, tgid = id >> 32;
	struct thread_state *s = thread_find(tid);
	/* Once the session has ended the agent reads the slot as it is. */
	if (s && !session_closed(s)) {
		flush_batches(s);
		flush_exits(s);
		/* A slot is free for the next thread (task storage, whose tid
		 * is 0, goes with this one). */
		s->tid = 0;
	}
	if (tid != tgid) {
		targets.delete(&tid);
		return KEEP_EVENT;
	}
	/* The group leader: the VMM process is going away. */
	struct vm_info *vi = vms.lookup(&tgid);
	if (vi && !vi->exited_ns)
		vi->exited_ns = bpf_ktime_get_ns();
	return KEEP_EVENT;
}
