// SPDX-License-Identifier: GPL-2.0
/*
 * An independent conformance test of KVM_SET_IOREGION (kernel/patches),
 * written by a helper session from the api.rst text of the feature and the
 * uapi headers only, without the implementation: the documentation is the
 * contract, and this checks that the kernel keeps it.  tests/test_vm.py
 * builds it against the test kernel's headers and runs it in the test VM.
 *
 *   gcc -O2 -Wall -pthread -I<kernel>/usr/include -o conformance ioregionfd_conformance.c
 *   ./conformance        (as root, on a kernel with KVM_CAP_IOREGIONFD)
 *
 * Every check runs in its own forked child process with its own VM(s); the
 * parent bounds each check with a hard timeout, and inside a check every
 * KVM_RUN is bounded by alarm() and every wait for the device task by a
 * timed poll, so a hang is reported as "not ok", never a stuck program.
 *
 * The guest is flat 64-bit long mode code, assembled by hand below (each
 * emitter documents its encoding).  It uses:
 *   - a memslot of 1 MiB at GPA 0 (page tables, code, result area, buffers);
 *   - MMIO at MMIO_BASE (256 MiB), outside every memslot but identity mapped;
 *   - OUT to SYNC_PORT (never inside an ioregion) as a sync point to the VMM;
 *   - results stored to RES_GPA + 8*slot, read back by the VMM;
 *   - HLT to end (no in-kernel irqchip, so HLT exits as KVM_EXIT_HLT).
 *
 * "./conf --dump-guests DIR" writes every guest program to DIR/<name>.bin
 * without touching /dev/kvm (for checking the encodings with objdump:
 * objdump -D -b binary -m i386:x86-64 -M intel DIR/<name>.bin).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <linux/kvm.h>

_Static_assert(sizeof(struct kvm_ioregionfd_cmd) == 32, "command is 32 bytes");
_Static_assert(sizeof(struct kvm_ioregionfd_resp) == 32, "response is 32 bytes");
_Static_assert(sizeof(struct kvm_ioregion) == 64, "kvm_ioregion layout");

/* ------------------------------------------------------------------ */
/* Guest physical layout                                                */
/* ------------------------------------------------------------------ */
#define MEM_SIZE	0x100000ULL	/* memslot 0: [0, 1 MiB) */
#define PML4_GPA	0x1000ULL
#define PDPT_GPA	0x2000ULL
#define PD_GPA		0x3000ULL
#define CODE_GPA	0x8000ULL
#define CODE_MAX	0x4000ULL
#define RES_GPA		0x20000ULL	/* guest results, 8 bytes per slot */
#define RES_SLOTS	64
#define DATA_GPA	0x30000ULL	/* buffers for string I/O and SSE */
#define STACK_GPA	0x80000ULL
#define MMIO_BASE	0x10000000ULL	/* 256 MiB: no memslot, identity mapped */
#define SYNC_PORT	0x510		/* guest "sync point" port, never an ioregion */
#define SENTINEL	0xDEADBEEFDEADBEEFULL

#define RUN_TIMEOUT_S	5	/* bound on one KVM_RUN */
#define DEV_WAIT_MS	2000	/* bound on waiting for device-side events */
#define CHECK_TIMEOUT_MS 60000	/* hard bound on one check (parent side) */

#define PENDING		KVM_RUN_X86_IOREGIONFD_PENDING

#ifndef KVM_DEV
#define KVM_DEV		"/dev/kvm"	/* -DKVM_DEV=... for a harness dry run */
#endif

/* ------------------------------------------------------------------ */
/* Failure reporting                                                    */
/* ------------------------------------------------------------------ */
static char g_msg[6000];
static int g_nfail;
static char g_note[512];	/* informational suffix for passing checks */

static void failf(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void failf(const char *fmt, ...)
{
	size_t l = strlen(g_msg);
	va_list ap;

	if (l && l + 3 < sizeof(g_msg)) {
		strcat(g_msg, "; ");
		l += 2;
	}
	if (l + 1 < sizeof(g_msg)) {
		va_start(ap, fmt);
		vsnprintf(g_msg + l, sizeof(g_msg) - l, fmt, ap);
		va_end(ap);
	}
	g_nfail++;
}

static const char *en(int e)
{
	static char b[32];

	switch (e) {
	case 0: return "success";
	case EINVAL: return "EINVAL";
	case EBADF: return "EBADF";
	case ENOTSOCK: return "ENOTSOCK";
	case EPROTOTYPE: return "EPROTOTYPE";
	case ENOTCONN: return "ENOTCONN";
	case EBUSY: return "EBUSY";
	case EEXIST: return "EEXIST";
	case ENOENT: return "ENOENT";
	case ENOSPC: return "ENOSPC";
	case ENOMEM: return "ENOMEM";
	case EFAULT: return "EFAULT";
	case EINTR: return "EINTR";
	case EPIPE: return "EPIPE";
	case ECONNRESET: return "ECONNRESET";
	case EPROTO: return "EPROTO";
	case EAGAIN: return "EAGAIN";
	case ENOTTY: return "ENOTTY";
	case EPERM: return "EPERM";
	case EACCES: return "EACCES";
	case E2BIG: return "E2BIG";
	case ENXIO: return "ENXIO";
	case EOPNOTSUPP: return "EOPNOTSUPP";
	case ENODEV: return "ENODEV";
	}
	snprintf(b, sizeof(b), "errno %d", e);
	return b;
}

/* "what: got X, doc says Y" for an ioctl result given as 0 or errno. */
static int want(const char *what, int got, int exp)
{
	if (got == exp)
		return 1;
	failf("%s: got %s, doc says %s", what, en(got), en(exp));
	return 0;
}

static long long now_ms(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec * 1000LL + ts.tv_nsec / 1000000;
}

static void msleep(int ms)
{
	struct timespec ts = { ms / 1000, (ms % 1000) * 1000000L };

	while (nanosleep(&ts, &ts) && errno == EINTR)
		;
}

/* ------------------------------------------------------------------ */
/* Signals (child side)                                                 */
/* ------------------------------------------------------------------ */
static volatile sig_atomic_t g_alarm;	/* our KVM_RUN timeout fired */
static volatile sig_atomic_t g_usr1;	/* test signal deliveries */
static volatile int g_in_run;		/* main thread is inside KVM_RUN */
static pthread_t g_main;

static void on_alarm(int s) { (void)s; g_alarm = 1; }
static void on_usr1(int s) { (void)s; g_usr1++; }

static void child_setup(void)
{
	struct sigaction sa;
	sigset_t set;

	memset(&sa, 0, sizeof(sa));
	sa.sa_handler = on_alarm;	/* no SA_RESTART: KVM_RUN returns EINTR */
	sigaction(SIGALRM, &sa, NULL);
	sa.sa_handler = on_usr1;
	sigaction(SIGUSR1, &sa, NULL);
	/* A VMM does not want to die if a send hits a closed peer. */
	signal(SIGPIPE, SIG_IGN);
	sigemptyset(&set);
	sigaddset(&set, SIGALRM);
	sigaddset(&set, SIGUSR1);
	pthread_sigmask(SIG_UNBLOCK, &set, NULL);
	g_main = pthread_self();
}

/* Create a helper thread with every signal blocked, so that SIGALRM and
 * SIGUSR1 are only ever delivered to the vCPU (main) thread. */
static int spawn(pthread_t *t, void *(*fn)(void *), void *arg, int detach)
{
	sigset_t all, old;
	int r;

	sigfillset(&all);
	pthread_sigmask(SIG_BLOCK, &all, &old);
	r = pthread_create(t, NULL, fn, arg);
	pthread_sigmask(SIG_SETMASK, &old, NULL);
	if (r) {
		failf("pthread_create: %s", strerror(r));
		return 0;
	}
	if (detach)
		pthread_detach(*t);
	return 1;
}

/* ------------------------------------------------------------------ */
/* Guest code emitter (x86-64, 64-bit mode)                             */
/* ------------------------------------------------------------------ */
struct asmb {
	uint8_t *b;
	size_t n, cap;
	int overflow;
};

enum { RAX = 0, RCX = 1, RDX = 2, RBX = 3, RSP = 4, RBP = 5, RSI = 6, RDI = 7 };

static void e8(struct asmb *a, uint8_t x)
{
	if (a->n < a->cap)
		a->b[a->n] = x;
	else
		a->overflow = 1;
	a->n++;
}

static void e32(struct asmb *a, uint32_t x)
{
	for (int i = 0; i < 4; i++)
		e8(a, x >> (8 * i));
}

static void e64(struct asmb *a, uint64_t x)
{
	for (int i = 0; i < 8; i++)
		e8(a, x >> (8 * i));
}

/* REX.W B8+r imm64: mov r64, imm64  (e.g. 48 BB = mov rbx, imm64) */
static void g_mov_r64(struct asmb *a, int reg, uint64_t v)
{
	e8(a, 0x48);
	e8(a, 0xB8 + reg);
	e64(a, v);
}

/* B8+r imm32: mov r32, imm32 (zero-extends into r64; BA = edx, B9 = ecx) */
static void g_mov_r32(struct asmb *a, int reg, uint32_t v)
{
	e8(a, 0xB8 + reg);
	e32(a, v);
}

/* 31 C0: xor eax, eax (ModRM C0: mod=11 reg=eax rm=eax; clears all of rax) */
static void g_xor_eax(struct asmb *a)
{
	e8(a, 0x31);
	e8(a, 0xC0);
}

/*
 * Store al/ax/eax/rax to [rbx].  ModRM 03 = mod 00, reg 000 (rax), rm 011 ([rbx]).
 *   1: 88 03        mov [rbx], al
 *   2: 66 89 03     mov [rbx], ax   (66 = operand size 16)
 *   4: 89 03        mov [rbx], eax
 *   8: 48 89 03     mov [rbx], rax  (48 = REX.W)
 */
static void g_store_rbx(struct asmb *a, int size)
{
	switch (size) {
	case 1: e8(a, 0x88); e8(a, 0x03); break;
	case 2: e8(a, 0x66); e8(a, 0x89); e8(a, 0x03); break;
	case 4: e8(a, 0x89); e8(a, 0x03); break;
	case 8: e8(a, 0x48); e8(a, 0x89); e8(a, 0x03); break;
	default: a->overflow = 1;
	}
}

/*
 * Load al/ax/eax/rax from [rbx].
 *   1: 8A 03        mov al, [rbx]
 *   2: 66 8B 03     mov ax, [rbx]
 *   4: 8B 03        mov eax, [rbx]   (zero-extends into rax)
 *   8: 48 8B 03     mov rax, [rbx]
 */
static void g_load_rbx(struct asmb *a, int size)
{
	switch (size) {
	case 1: e8(a, 0x8A); e8(a, 0x03); break;
	case 2: e8(a, 0x66); e8(a, 0x8B); e8(a, 0x03); break;
	case 4: e8(a, 0x8B); e8(a, 0x03); break;
	case 8: e8(a, 0x48); e8(a, 0x8B); e8(a, 0x03); break;
	default: a->overflow = 1;
	}
}

/* 48 89 04 25 disp32: mov [disp32], rax
 * (ModRM 04: mod 00, reg rax, rm 100 = SIB; SIB 25: no index, no base -> disp32) */
static void g_save_rax(struct asmb *a, int slot)
{
	e8(a, 0x48); e8(a, 0x89); e8(a, 0x04); e8(a, 0x25);
	e32(a, (uint32_t)(RES_GPA + 8 * slot));
}

/* out dx, al/ax/eax:  EE / 66 EF / EF */
static void g_out(struct asmb *a, int size)
{
	switch (size) {
	case 1: e8(a, 0xEE); break;
	case 2: e8(a, 0x66); e8(a, 0xEF); break;
	case 4: e8(a, 0xEF); break;
	default: a->overflow = 1;
	}
}

/* in al/ax/eax, dx:  EC / 66 ED / ED */
static void g_in(struct asmb *a, int size)
{
	switch (size) {
	case 1: e8(a, 0xEC); break;
	case 2: e8(a, 0x66); e8(a, 0xED); break;
	case 4: e8(a, 0xED); break;
	default: a->overflow = 1;
	}
}

/* F3 6C: rep insb (byte [rdi] <- port dx, rcx times, rdi += 1) */
static void g_rep_insb(struct asmb *a)
{
	e8(a, 0xF3); e8(a, 0x6C);
}

/* 66 F3 6F: rep outsw (port dx <- word [rsi], rcx times, rsi += 2) */
static void g_rep_outsw(struct asmb *a)
{
	e8(a, 0x66); e8(a, 0xF3); e8(a, 0x6F);
}

/* F3 0F 6F 04 25 disp32: movdqu xmm0, [disp32] (ModRM 04 -> SIB 25 -> disp32) */
static void g_movdqu_xmm0_load_abs(struct asmb *a, uint32_t addr)
{
	e8(a, 0xF3); e8(a, 0x0F); e8(a, 0x6F); e8(a, 0x04); e8(a, 0x25);
	e32(a, addr);
}

/* F3 0F 7F 03: movdqu [rbx], xmm0 (ModRM 03: reg xmm0, rm [rbx]) */
static void g_movdqu_store_rbx_xmm0(struct asmb *a)
{
	e8(a, 0xF3); e8(a, 0x0F); e8(a, 0x7F); e8(a, 0x03);
}

/* F3 0F 6F 0B: movdqu xmm1, [rbx] (ModRM 0B: mod 00, reg 001 = xmm1, rm 011 = [rbx]) */
static void g_movdqu_xmm1_load_rbx(struct asmb *a)
{
	e8(a, 0xF3); e8(a, 0x0F); e8(a, 0x6F); e8(a, 0x0B);
}

/* F3 0F 7F 0C 25 disp32: movdqu [disp32], xmm1 (ModRM 0C: reg xmm1, rm SIB) */
static void g_movdqu_store_abs_xmm1(struct asmb *a, uint32_t addr)
{
	e8(a, 0xF3); e8(a, 0x0F); e8(a, 0x7F); e8(a, 0x0C); e8(a, 0x25);
	e32(a, addr);
}

/* F4: hlt */
static void g_hlt(struct asmb *a)
{
	e8(a, 0xF4);
}

/* mov edx, SYNC_PORT (BA imm32); out dx, al (EE): a sync point for the VMM */
static void g_sync(struct asmb *a)
{
	g_mov_r32(a, RDX, SYNC_PORT);
	g_out(a, 1);
}

/* MMIO write: mov rbx, addr; mov rax, val; mov [rbx], {al,ax,eax,rax} */
static void g_mmio_w(struct asmb *a, uint64_t addr, int size, uint64_t rax)
{
	g_mov_r64(a, RBX, addr);
	g_mov_r64(a, RAX, rax);
	g_store_rbx(a, size);
}

/* MMIO read: mov rbx, addr; xor eax, eax; mov {al,ax,eax,rax}, [rbx]; mov [slot], rax */
static void g_mmio_r(struct asmb *a, uint64_t addr, int size, int slot)
{
	g_mov_r64(a, RBX, addr);
	g_xor_eax(a);
	g_load_rbx(a, size);
	g_save_rax(a, slot);
}

/* PIO write: mov edx, port; mov rax, val; out dx, {al,ax,eax} */
static void g_pio_w(struct asmb *a, uint16_t port, int size, uint64_t rax)
{
	g_mov_r32(a, RDX, port);
	g_mov_r64(a, RAX, rax);
	g_out(a, size);
}

/* PIO read: mov edx, port; xor eax, eax; in {al,ax,eax}, dx; mov [slot], rax */
static void g_pio_r(struct asmb *a, uint16_t port, int size, int slot)
{
	g_mov_r32(a, RDX, port);
	g_xor_eax(a);
	g_in(a, size);
	g_save_rax(a, slot);
}

static uint64_t mask(int size)
{
	return size >= 8 ? ~0ULL : (1ULL << (8 * size)) - 1;
}

static int lg2(int size)
{
	return size == 1 ? 0 : size == 2 ? 1 : size == 4 ? 2 : size == 8 ? 3 : 15;
}

/* The value the default device task answers for a read. */
static uint64_t dev_val(uint64_t user_data, uint64_t off)
{
	uint64_t x = off + 0x9E3779B97F4A7C15ULL + user_data * 0x100000001B3ULL;

	x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ULL;
	x = (x ^ (x >> 27)) * 0x94D049BB133111EBULL;
	return x ^ (x >> 31);
}

/* ------------------------------------------------------------------ */
/* VM setup                                                             */
/* ------------------------------------------------------------------ */
struct vm {
	int kvm, fd, vcpu;
	struct kvm_run *run;
	size_t runsz;
	uint8_t *mem;
};

static int vm_create(struct vm *vm)
{
	memset(vm, 0, sizeof(*vm));
	vm->vcpu = -1;
	vm->kvm = open(KVM_DEV, O_RDWR | O_CLOEXEC);
	if (vm->kvm < 0) {
		failf("open /dev/kvm: %s", strerror(errno));
		return 0;
	}
	vm->fd = ioctl(vm->kvm, KVM_CREATE_VM, 0);
	if (vm->fd < 0) {
		failf("KVM_CREATE_VM: %s", strerror(errno));
		return 0;
	}
	return 1;
}

static struct kvm_cpuid2 *get_cpuid(int kvm)
{
	static struct kvm_cpuid2 *c;
	int n = 128;

	while (!c) {
		struct kvm_cpuid2 *t = calloc(1, sizeof(*t) + n * sizeof(t->entries[0]));

		t->nent = n;
		if (ioctl(kvm, KVM_GET_SUPPORTED_CPUID, t) == 0) {
			c = t;
			break;
		}
		free(t);
		if (errno != E2BIG || n > 4096)
			return NULL;
		n *= 2;
	}
	return c;
}

static void seg(struct kvm_segment *s, uint16_t sel, uint8_t type, int code)
{
	memset(s, 0, sizeof(*s));
	s->base = 0;
	s->limit = 0xffffffff;
	s->selector = sel;
	s->type = type;
	s->present = 1;
	s->dpl = 0;
	s->s = 1;
	s->g = 1;
	s->l = code ? 1 : 0;	/* 64-bit code segment */
	s->db = code ? 0 : 1;	/* L=1 requires D=0 */
}

/* Memslot, identity page tables (1 GiB with 2 MiB pages), one vCPU in long mode. */
static int vm_add_cpu(struct vm *vm)
{
	struct kvm_userspace_memory_region mr;
	struct kvm_sregs sr;
	struct kvm_regs regs;
	struct kvm_cpuid2 *cpuid;
	uint64_t *pml4, *pdpt, *pd;
	int sz;

	vm->mem = mmap(NULL, MEM_SIZE, PROT_READ | PROT_WRITE,
		       MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
	if (vm->mem == MAP_FAILED) {
		failf("mmap guest memory: %s", strerror(errno));
		return 0;
	}
	memset(&mr, 0, sizeof(mr));
	mr.slot = 0;
	mr.guest_phys_addr = 0;
	mr.memory_size = MEM_SIZE;
	mr.userspace_addr = (uintptr_t)vm->mem;
	if (ioctl(vm->fd, KVM_SET_USER_MEMORY_REGION, &mr)) {
		failf("KVM_SET_USER_MEMORY_REGION: %s", strerror(errno));
		return 0;
	}

	pml4 = (uint64_t *)(vm->mem + PML4_GPA);
	pdpt = (uint64_t *)(vm->mem + PDPT_GPA);
	pd = (uint64_t *)(vm->mem + PD_GPA);
	pml4[0] = PDPT_GPA | 0x3;			/* P | RW */
	pdpt[0] = PD_GPA | 0x3;				/* P | RW */
	for (int i = 0; i < 512; i++)
		pd[i] = ((uint64_t)i << 21) | 0x83;	/* P | RW | PS (2 MiB) */
	for (int i = 0; i < RES_SLOTS; i++)
		((uint64_t *)(vm->mem + RES_GPA))[i] = SENTINEL;

	vm->vcpu = ioctl(vm->fd, KVM_CREATE_VCPU, 0);
	if (vm->vcpu < 0) {
		failf("KVM_CREATE_VCPU: %s", strerror(errno));
		return 0;
	}
	sz = ioctl(vm->kvm, KVM_GET_VCPU_MMAP_SIZE, 0);
	if (sz < (int)sizeof(struct kvm_run)) {
		failf("KVM_GET_VCPU_MMAP_SIZE: %d (%s)", sz, strerror(errno));
		return 0;
	}
	vm->runsz = sz;
	vm->run = mmap(NULL, sz, PROT_READ | PROT_WRITE, MAP_SHARED, vm->vcpu, 0);
	if (vm->run == MAP_FAILED) {
		failf("mmap kvm_run: %s", strerror(errno));
		return 0;
	}
	/* Give the guest the supported CPUID (long mode, SSE); if that is
	 * refused, go on: KVM_SET_SREGS below reports any real problem. */
	cpuid = get_cpuid(vm->kvm);
	if (cpuid)
		(void)ioctl(vm->vcpu, KVM_SET_CPUID2, cpuid);

	if (ioctl(vm->vcpu, KVM_GET_SREGS, &sr)) {
		failf("KVM_GET_SREGS: %s", strerror(errno));
		return 0;
	}
	seg(&sr.cs, 0x08, 11, 1);		/* execute/read, accessed */
	seg(&sr.ds, 0x10, 3, 0);		/* read/write, accessed */
	sr.es = sr.fs = sr.gs = sr.ss = sr.ds;
	memset(&sr.tr, 0, sizeof(sr.tr));
	sr.tr.selector = 0x18;
	sr.tr.limit = 0x67;
	sr.tr.type = 11;			/* busy 64-bit TSS */
	sr.tr.present = 1;
	memset(&sr.ldt, 0, sizeof(sr.ldt));
	sr.ldt.type = 2;
	sr.ldt.unusable = 1;
	sr.cr0 = 0x80000033;	/* PG | NE | ET | MP | PE (EM=0, TS=0: SSE usable) */
	sr.cr3 = PML4_GPA;
	sr.cr4 = 0x620;		/* OSXMMEXCPT | OSFXSR | PAE */
	sr.efer = 0x500;	/* LMA | LME */
	if (ioctl(vm->vcpu, KVM_SET_SREGS, &sr)) {
		failf("KVM_SET_SREGS (long mode): %s", strerror(errno));
		return 0;
	}
	memset(&regs, 0, sizeof(regs));
	regs.rip = CODE_GPA;
	regs.rsp = STACK_GPA;
	regs.rflags = 0x2;
	if (ioctl(vm->vcpu, KVM_SET_REGS, &regs)) {
		failf("KVM_SET_REGS: %s", strerror(errno));
		return 0;
	}
	return 1;
}

typedef void (*guest_fn)(struct asmb *a);

/* A VM with memory, a long-mode vCPU and the given guest program loaded. */
static int vm_guest(struct vm *vm, guest_fn g)
{
	struct asmb a;

	if (!vm_create(vm) || !vm_add_cpu(vm))
		return 0;
	a.b = vm->mem + CODE_GPA;
	a.n = 0;
	a.cap = CODE_MAX;
	a.overflow = 0;
	g(&a);
	if (a.overflow) {
		failf("internal: guest program does not fit / bad size");
		return 0;
	}
	return 1;
}

static uint64_t slot(struct vm *vm, int i)
{
	uint64_t v;

	memcpy(&v, vm->mem + RES_GPA + 8 * i, 8);
	return v;
}

/* ------------------------------------------------------------------ */
/* KVM_RUN and exit expectations                                        */
/* ------------------------------------------------------------------ */
static int g_rr, g_re;	/* last KVM_RUN return value and errno */

static int vrun(struct vm *vm)
{
	int r, e;

	g_alarm = 0;
	g_in_run = 1;
	alarm(RUN_TIMEOUT_S);
	r = ioctl(vm->vcpu, KVM_RUN, 0);
	e = errno;
	alarm(0);
	g_in_run = 0;
	g_rr = r;
	g_re = r < 0 ? e : 0;
	return r;
}

static const char *xname(uint32_t r)
{
	static char b[32];

	switch (r) {
	case KVM_EXIT_IO: return "KVM_EXIT_IO";
	case KVM_EXIT_MMIO: return "KVM_EXIT_MMIO";
	case KVM_EXIT_HLT: return "KVM_EXIT_HLT";
	case KVM_EXIT_INTR: return "KVM_EXIT_INTR";
	case KVM_EXIT_SHUTDOWN: return "KVM_EXIT_SHUTDOWN";
	case KVM_EXIT_FAIL_ENTRY: return "KVM_EXIT_FAIL_ENTRY";
	case KVM_EXIT_INTERNAL_ERROR: return "KVM_EXIT_INTERNAL_ERROR";
	case KVM_EXIT_IOREGIONFD_FAILED: return "KVM_EXIT_IOREGIONFD_FAILED";
	}
	snprintf(b, sizeof(b), "exit_reason %u", r);
	return b;
}

/* Describe the outcome of the last KVM_RUN. */
static const char *xdesc(struct vm *vm)
{
	static char b[600];
	struct kvm_run *run = vm->run;
	struct kvm_regs regs;
	int n;

	if (g_rr < 0 && g_re == EINTR && g_alarm)
		return "KVM_RUN did not return within the test timeout (hang)";
	if (g_rr < 0)
		n = snprintf(b, sizeof(b), "KVM_RUN=-1 errno=%s exit_reason=%s flags=0x%x",
			     en(g_re), xname(run->exit_reason), run->flags);
	else if (run->exit_reason == KVM_EXIT_IO)
		n = snprintf(b, sizeof(b), "KVM_EXIT_IO %s port=0x%x size=%u count=%u flags=0x%x",
			     run->io.direction == KVM_EXIT_IO_OUT ? "out" : "in",
			     run->io.port, run->io.size, run->io.count, run->flags);
	else if (run->exit_reason == KVM_EXIT_MMIO)
		n = snprintf(b, sizeof(b), "KVM_EXIT_MMIO %s addr=0x%llx len=%u flags=0x%x",
			     run->mmio.is_write ? "write" : "read",
			     (unsigned long long)run->mmio.phys_addr, run->mmio.len, run->flags);
	else if (run->exit_reason == KVM_EXIT_IOREGIONFD_FAILED)
		n = snprintf(b, sizeof(b),
			     "KVM_EXIT_IOREGIONFD_FAILED addr=0x%llx len=%u is_write=%u pio=%u user_data=0x%llx error=%d(%s) flags=0x%x",
			     (unsigned long long)run->ioregionfd_failed.addr,
			     run->ioregionfd_failed.len, run->ioregionfd_failed.is_write,
			     run->ioregionfd_failed.pio,
			     (unsigned long long)run->ioregionfd_failed.user_data,
			     run->ioregionfd_failed.error, en(-run->ioregionfd_failed.error),
			     run->flags);
	else if (run->exit_reason == KVM_EXIT_INTERNAL_ERROR)
		n = snprintf(b, sizeof(b), "KVM_EXIT_INTERNAL_ERROR suberror=%u",
			     run->internal.suberror);
	else
		n = snprintf(b, sizeof(b), "KVM_RUN=0 %s flags=0x%x",
			     xname(run->exit_reason), run->flags);
	if (n > 0 && n < (int)sizeof(b) - 40 && !ioctl(vm->vcpu, KVM_GET_REGS, &regs))
		snprintf(b + n, sizeof(b) - n, " (guest rip=0x%llx)",
			 (unsigned long long)regs.rip);
	return b;
}

static int expect_hlt(struct vm *vm, const char *what)
{
	vrun(vm);
	if (g_rr == 0 && vm->run->exit_reason == KVM_EXIT_HLT)
		return 1;
	failf("%s: got %s, expected the guest to reach HLT (KVM_EXIT_HLT)", what, xdesc(vm));
	return 0;
}

static int expect_sync(struct vm *vm, const char *what)
{
	struct kvm_run *run = vm->run;

	vrun(vm);
	if (g_rr == 0 && run->exit_reason == KVM_EXIT_IO &&
	    run->io.direction == KVM_EXIT_IO_OUT && run->io.port == SYNC_PORT)
		return 1;
	failf("%s: got %s, expected the guest's sync OUT to port 0x%x", what, xdesc(vm), SYNC_PORT);
	return 0;
}

/* Expect a KVM_EXIT_MMIO for the VMM; for reads answer rdata. */
static int expect_mmio(struct vm *vm, const char *what, uint64_t addr, int len,
		       int is_write, uint64_t wdata, uint64_t rdata)
{
	struct kvm_run *run = vm->run;
	uint64_t d = 0;

	vrun(vm);
	if (g_rr != 0 || run->exit_reason != KVM_EXIT_MMIO || run->mmio.phys_addr != addr ||
	    (int)run->mmio.len != len || !!run->mmio.is_write != !!is_write) {
		failf("%s: got %s, doc: the access goes to the VMM as KVM_EXIT_MMIO %s addr=0x%llx len=%d",
		      what, xdesc(vm), is_write ? "write" : "read", (unsigned long long)addr, len);
		return 0;
	}
	if (is_write) {
		memcpy(&d, run->mmio.data, len);
		if (d != (wdata & mask(len))) {
			failf("%s: KVM_EXIT_MMIO write data 0x%llx, guest wrote 0x%llx", what,
			      (unsigned long long)d, (unsigned long long)(wdata & mask(len)));
			return 0;
		}
	} else {
		memcpy(run->mmio.data, &rdata, len);
	}
	return 1;
}

/* Expect a single (non-string) KVM_EXIT_IO for the VMM; for IN answer rdata. */
static int expect_io(struct vm *vm, const char *what, uint16_t port, int size,
		     int dir, uint32_t wdata, uint32_t rdata)
{
	struct kvm_run *run = vm->run;
	uint8_t *p;
	uint32_t d = 0;

	vrun(vm);
	if (g_rr != 0 || run->exit_reason != KVM_EXIT_IO || run->io.port != port ||
	    run->io.size != size || run->io.direction != dir || run->io.count != 1) {
		failf("%s: got %s, doc: the access goes to the VMM as KVM_EXIT_IO %s port=0x%x size=%d count=1",
		      what, xdesc(vm), dir == KVM_EXIT_IO_OUT ? "out" : "in", port, size);
		return 0;
	}
	p = (uint8_t *)run + run->io.data_offset;
	if (dir == KVM_EXIT_IO_OUT) {
		memcpy(&d, p, size);
		if (d != (wdata & (uint32_t)mask(size))) {
			failf("%s: KVM_EXIT_IO out data 0x%x, guest wrote 0x%x", what, d,
			      wdata & (uint32_t)mask(size));
			return 0;
		}
	} else {
		memcpy(p, &rdata, size);
	}
	return 1;
}

/* Expect KVM_EXIT_IOREGIONFD_FAILED with the given fields (err 0: any negative). */
static int expect_failed(struct vm *vm, const char *what, uint64_t addr, int len,
			 int is_write, int pio, uint64_t ud, int err)
{
	struct kvm_run *run = vm->run;
	int ok;

	vrun(vm);
	ok = g_rr == 0 && run->exit_reason == KVM_EXIT_IOREGIONFD_FAILED &&
	     run->ioregionfd_failed.addr == addr && (int)run->ioregionfd_failed.len == len &&
	     run->ioregionfd_failed.is_write == !!is_write &&
	     run->ioregionfd_failed.pio == !!pio &&
	     run->ioregionfd_failed.user_data == ud &&
	     (err ? run->ioregionfd_failed.error == err : run->ioregionfd_failed.error < 0) &&
	     (run->flags & PENDING);
	if (!ok)
		failf("%s: got %s, doc: KVM_RUN=0, KVM_EXIT_IOREGIONFD_FAILED addr=0x%llx len=%d is_write=%d pio=%d user_data=0x%llx error=%s, flags with KVM_RUN_X86_IOREGIONFD_PENDING",
		      what, xdesc(vm), (unsigned long long)addr, len, !!is_write, !!pio,
		      (unsigned long long)ud, err ? en(-err) : "<negative errno>");
	return ok;
}

/* Expect KVM_RUN = -1/EINTR with KVM_EXIT_INTR, caused by our test signal. */
static int expect_intr(struct vm *vm, const char *what, int want_pending)
{
	struct kvm_run *run = vm->run;

	if (g_rr == -1 && g_re == EINTR && !g_alarm && run->exit_reason == KVM_EXIT_INTR &&
	    !!(run->flags & PENDING) == !!want_pending)
		return 1;
	failf("%s: got %s, doc: KVM_RUN=-1 errno=EINTR, KVM_EXIT_INTR, KVM_RUN_X86_IOREGIONFD_PENDING %s",
	      what, xdesc(vm), want_pending ? "set" : "clear");
	return 0;
}

/* ------------------------------------------------------------------ */
/* ioregion / socket helpers                                            */
/* ------------------------------------------------------------------ */
static int ior(int vmfd, uint64_t gpa, uint64_t size, uint64_t ud, int rfd, int wfd,
	       uint32_t flags)
{
	struct kvm_ioregion r;

	memset(&r, 0, sizeof(r));
	r.guest_paddr = gpa;
	r.memory_size = size;
	r.user_data = ud;
	r.read_fd = rfd;
	r.write_fd = wfd;
	r.flags = flags;
	return ioctl(vmfd, KVM_SET_IOREGION, &r) ? errno : 0;
}

/* Assign; on failure report and return 0. */
static int ior_ok(int vmfd, const char *what, uint64_t gpa, uint64_t size, uint64_t ud,
		  int rfd, int wfd, uint32_t flags)
{
	int r = ior(vmfd, gpa, size, ud, rfd, wfd, flags);

	if (r)
		failf("%s: KVM_SET_IOREGION(paddr=0x%llx size=0x%llx flags=0x%x) failed with %s, expected success",
		      what, (unsigned long long)gpa, (unsigned long long)size, flags, en(r));
	return !r;
}

static int seqpair(int sv[2])
{
	if (socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, sv)) {
		failf("socketpair(AF_UNIX, SOCK_SEQPACKET): %s", strerror(errno));
		return 0;
	}
	return 1;
}

static int mk_ioeventfd(int vmfd, uint64_t addr, uint32_t len, int pio)
{
	struct kvm_ioeventfd e;
	int efd = eventfd(0, EFD_CLOEXEC);

	memset(&e, 0, sizeof(e));
	e.addr = addr;
	e.len = len;
	e.fd = efd;
	e.flags = pio ? KVM_IOEVENTFD_FLAG_PIO : 0;
	return ioctl(vmfd, KVM_IOEVENTFD, &e) ? errno : 0;
}

static int mk_zone(int vmfd, uint64_t addr, uint32_t size, int pio)
{
	struct kvm_coalesced_mmio_zone z;

	memset(&z, 0, sizeof(z));
	z.addr = addr;
	z.size = size;
	z.pio = pio;
	return ioctl(vmfd, KVM_REGISTER_COALESCED_MMIO, &z) ? errno : 0;
}

static int mk_pit(int vmfd, uint32_t flags)
{
	struct kvm_pit_config pc;

	memset(&pc, 0, sizeof(pc));
	pc.flags = flags;
	return ioctl(vmfd, KVM_CREATE_PIT2, &pc) ? errno : 0;
}

static int mk_irqchip(int vmfd)
{
	return ioctl(vmfd, KVM_CREATE_IRQCHIP, 0) ? errno : 0;
}

/* ------------------------------------------------------------------ */
/* The device task                                                      */
/* ------------------------------------------------------------------ */
#define MAXLOG 256
enum { ACT_RESPOND, ACT_NONE, ACT_CLOSE };

struct dev;
typedef int (*hook_fn)(struct dev *d, const struct kvm_ioregionfd_cmd *c, int idx);

struct dev {
	int cfd, rfd;		/* device ends: commands arrive on cfd, responses go to rfd */
	pthread_t th;
	int started;
	pthread_mutex_t mu;
	struct kvm_ioregionfd_cmd log[MAXLOG];
	int nlog;
	int nbad, badlen;	/* messages that were not 32 bytes */
	volatile int eof, err;
	volatile int stop;
	volatile int gate;	/* while set, the device does not read its socket */
	int close_on_pollin;	/* close the socket as soon as a command is readable */
	hook_fn hook;
	/* scratch space for hooks */
	int mode;
	int vmfd, kfd;
	volatile int flag;
	int counter;
	long long t[4];
	int r[4];
	int in_run[4];
	void *p;
};

static void dev_init(struct dev *d, int cfd, int rfd, hook_fn hook)
{
	memset(d, 0, sizeof(*d));
	d->cfd = cfd;
	d->rfd = rfd;
	d->hook = hook;
	pthread_mutex_init(&d->mu, NULL);
}

static int dev_send_resp(struct dev *d, uint64_t data)
{
	struct kvm_ioregionfd_resp r;

	memset(&r, 0, sizeof(r));
	r.data = data;
	return send(d->rfd, &r, sizeof(r), MSG_NOSIGNAL) == (ssize_t)sizeof(r);
}

static void dev_close(struct dev *d)
{
	if (d->rfd >= 0 && d->rfd != d->cfd)
		close(d->rfd);
	if (d->cfd >= 0)
		close(d->cfd);
	d->cfd = d->rfd = -1;
}

static void *dev_thread(void *arg)
{
	struct dev *d = arg;
	unsigned char buf[128];

	while (!d->stop) {
		struct pollfd pfd = { .fd = d->cfd, .events = POLLIN };
		struct kvm_ioregionfd_cmd c;
		ssize_t n;
		int r, idx, act;

		if (d->gate) {
			msleep(2);
			continue;
		}
		r = poll(&pfd, 1, 20);
		if (r <= 0)
			continue;
		if (d->close_on_pollin && (pfd.revents & POLLIN)) {
			dev_close(d);
			break;
		}
		if (!(pfd.revents & POLLIN)) {
			if (pfd.revents & (POLLHUP | POLLERR | POLLNVAL)) {
				d->eof = 1;
				break;
			}
			continue;
		}
		n = recv(d->cfd, buf, sizeof(buf), MSG_DONTWAIT);
		if (n < 0) {
			if (errno == EAGAIN || errno == EINTR)
				continue;
			d->err = errno;
			break;
		}
		if (n == 0) {
			d->eof = 1;
			break;
		}
		if (n != (ssize_t)sizeof(c)) {
			pthread_mutex_lock(&d->mu);
			d->nbad++;
			d->badlen = n;
			pthread_mutex_unlock(&d->mu);
			continue;
		}
		memcpy(&c, buf, sizeof(c));
		pthread_mutex_lock(&d->mu);
		idx = d->nlog;
		if (d->nlog < MAXLOG)
			d->log[d->nlog++] = c;
		pthread_mutex_unlock(&d->mu);
		act = d->hook ? d->hook(d, &c, idx) : ACT_RESPOND;
		if (act == ACT_RESPOND && (c.info & KVM_IOREGIONFD_RESP))
			dev_send_resp(d, c.cmd == KVM_IOREGIONFD_CMD_READ ?
				      dev_val(c.user_data, c.offset) : 0);
		else if (act == ACT_CLOSE) {
			dev_close(d);
			break;
		}
	}
	return NULL;
}

static int dev_start(struct dev *d)
{
	if (!spawn(&d->th, dev_thread, d, 0))
		return 0;
	d->started = 1;
	return 1;
}

static int dev_n(struct dev *d)
{
	int n;

	pthread_mutex_lock(&d->mu);
	n = d->nlog;
	pthread_mutex_unlock(&d->mu);
	return n;
}

/* Wait (bounded) until the device has received at least n commands. */
static int dev_wait(struct dev *d, int n, int ms)
{
	long long end = now_ms() + ms;

	while (dev_n(d) < n && now_ms() < end)
		msleep(1);
	return dev_n(d) >= n;
}

/* Wait for n commands, then a little more to catch extra ones; report mismatches. */
static int dev_expect_n(struct dev *d, int n, const char *what)
{
	dev_wait(d, n, DEV_WAIT_MS);
	msleep(30);
	if (dev_n(d) != n) {
		failf("%s: the device task received %d command(s), expected %d", what, dev_n(d), n);
		return 0;
	}
	if (d->nbad) {
		failf("%s: the device task received %d message(s) of %d bytes, doc: commands are 32 bytes",
		      what, d->nbad, d->badlen);
		return 0;
	}
	return 1;
}

static int cmd_is(const struct kvm_ioregionfd_cmd *c, int idx, int cmd, int size, int resp,
		  uint64_t ud, uint64_t off, uint64_t data)
{
	int pad = 0;
	uint8_t info = lg2(size) | (resp ? KVM_IOREGIONFD_RESP : 0);

	for (int i = 0; i < 6; i++)
		pad |= c->pad[i];
	if (c->cmd == cmd && c->info == info && !pad && c->user_data == ud &&
	    c->offset == off && c->data == data)
		return 1;
	failf("command #%d: got {cmd=%u info=0x%02x pad=%s user_data=0x%llx offset=0x%llx data=0x%llx}, doc expects {cmd=%d info=0x%02x pad=0 user_data=0x%llx offset=0x%llx data=0x%llx}",
	      idx, c->cmd, c->info, pad ? "nonzero" : "0", (unsigned long long)c->user_data,
	      (unsigned long long)c->offset, (unsigned long long)c->data, cmd, info,
	      (unsigned long long)ud, (unsigned long long)off, (unsigned long long)data);
	return 0;
}

/* ------------------------------------------------------------------ */
/* Guest programs                                                       */
/* ------------------------------------------------------------------ */
#define ARRAY_SIZE(x) (sizeof(x) / sizeof((x)[0]))
#define R0		MMIO_BASE			/* main MMIO region */
#define UD		0x1122334455667788ULL		/* main region's user_data */
#define UD2		0x00C0FFEE00000002ULL
#define UD3		0x00C0FFEE00000003ULL
#define UD4		0x00C0FFEE00000004ULL
#define PIO_A		0x600		/* PIO region for the format check */
#define PIO_S		0x640		/* PIO region for string I/O */
#define PIO_W		0x680		/* PIO region for the signal check */
#define PIO_P		0x700		/* 1-port PIO region, partial accesses */
#define PIO_D		0x6C0		/* PIO region that gets deassigned */
#define ZA		(MMIO_BASE + 0x300)	/* zero-size posted region */
#define PA		(MMIO_BASE + 0x100)	/* 4-byte region, partial accesses */
#define PB		(MMIO_BASE + 0x200)	/* two adjacent 4-byte regions */

static size_t g_lbl;	/* code offset recorded by some programs */

static const struct { uint64_t off; int size; uint64_t rax; } mmio_w[] = {
	{ 0x10, 1, 0x5555555555555511ULL },	/* data 0x11 */
	{ 0x21, 2, 0x666666666666A2B3ULL },	/* data 0xA2B3, unaligned */
	{ 0x32, 4, 0x77777777C4D5E6F7ULL },	/* data 0xC4D5E6F7, unaligned */
	{ 0x43, 8, 0x18293A4B5C6D7E8FULL },	/* unaligned */
};
static const struct { uint64_t off; int size; } mmio_r[] = {
	{ 0x51, 1 }, { 0x62, 2 }, { 0x74, 4 }, { 0x88, 8 }, { 0xFF8, 8 },
};

/* writes of each size, reads of each size into slots 0.., hlt */
static void gb_mmio_fmt(struct asmb *a)
{
	for (size_t i = 0; i < ARRAY_SIZE(mmio_w); i++)
		g_mmio_w(a, R0 + mmio_w[i].off, mmio_w[i].size, mmio_w[i].rax);
	for (size_t i = 0; i < ARRAY_SIZE(mmio_r); i++)
		g_mmio_r(a, R0 + mmio_r[i].off, mmio_r[i].size, i);
	g_hlt(a);
}

static const struct { uint16_t off; int size; uint64_t rax; } pio_w[] = {
	{ 0, 1, 0x12345678ABCDEF5AULL },	/* data 0x5A */
	{ 2, 2, 0x12345678ABCD1EE7ULL },	/* data 0x1EE7 */
	{ 4, 4, 0x1234567889ABCDEFULL },	/* data 0x89ABCDEF */
};
static const struct { uint16_t off; int size; } pio_r[] = { { 1, 1 }, { 6, 2 }, { 4, 4 } };

static void gb_pio_fmt(struct asmb *a)
{
	for (size_t i = 0; i < ARRAY_SIZE(pio_w); i++)
		g_pio_w(a, PIO_A + pio_w[i].off, pio_w[i].size, pio_w[i].rax);
	for (size_t i = 0; i < ARRAY_SIZE(pio_r); i++)
		g_pio_r(a, PIO_A + pio_r[i].off, pio_r[i].size, i);
	g_hlt(a);
}

/* region 1 at R0, region 2 at R0+0x1000, same socket pair */
static void gb_two(struct asmb *a)
{
	g_mmio_w(a, R0 + 0x8, 4, 0xFFFFFFFF12345678ULL);
	g_mmio_r(a, R0 + 0x1000 + 0x20, 2, 0);
	g_mmio_r(a, R0 + 0x10, 4, 1);
	g_hlt(a);
}

static void gb_nonposted(struct asmb *a)
{
	g_mmio_w(a, R0 + 4, 4, 0xA5A5A5A5A5A5A5A5ULL);
	g_sync(a);
	g_hlt(a);
}

static const struct { uint64_t off; int size; uint64_t rax; } posted_w[] = {
	{ 0x00, 1, 0x111111111111115AULL },
	{ 0x08, 8, 0x0123456789ABCDEFULL },
	{ 0x11, 2, 0x222222222222BEEFULL },
};

static void gb_posted(struct asmb *a)
{
	for (size_t i = 0; i < ARRAY_SIZE(posted_w); i++)
		g_mmio_w(a, R0 + posted_w[i].off, posted_w[i].size, posted_w[i].rax);
	g_sync(a);
	g_mmio_r(a, R0 + 0x20, 4, 0);
	g_hlt(a);
}

static void gb_zero(struct asmb *a)
{
	g_mmio_w(a, ZA, 4, 0x9999999911223344ULL);	/* -> device, offset 0 */
	g_mmio_w(a, ZA, 1, 0x8888888888888855ULL);	/* -> device, offset 0 */
	g_mmio_w(a, ZA + 1, 1, 0x7777777777777766ULL);	/* -> VMM */
	g_mmio_w(a, ZA - 1, 2, 0x6666666666667788ULL);	/* -> VMM (starts before) */
	g_mmio_r(a, ZA, 4, 0);				/* -> VMM (a read) */
	g_movdqu_xmm0_load_abs(a, DATA_GPA);		/* xmm0 = 16 bytes at DATA */
	g_mov_r64(a, RBX, ZA);
	g_movdqu_store_rbx_xmm0(a);			/* 8 -> device, 8 -> VMM */
	g_hlt(a);
}

static void gb_string(struct asmb *a)
{
	g_mov_r64(a, RSI, DATA_GPA);		/* 48 BE imm64: mov rsi, DATA */
	g_mov_r32(a, RCX, 3);			/* B9 imm32:   mov ecx, 3 */
	g_mov_r32(a, RDX, PIO_S + 2);		/* BA imm32:   mov edx, port */
	g_rep_outsw(a);
	g_mov_r64(a, RDI, DATA_GPA + 0x100);	/* 48 BF imm64: mov rdi, DATA+0x100 */
	g_mov_r32(a, RCX, 4);
	g_mov_r32(a, RDX, PIO_S + 1);
	g_rep_insb(a);
	g_hlt(a);
}

static void gb_cross(struct asmb *a)
{
	g_mmio_w(a, R0 + 0xFFD, 8, 0x8877665544332211ULL);
	g_mmio_r(a, R0 + 0xFFF, 4, 0);
	g_hlt(a);
}

static void gb_sse16(struct asmb *a)
{
	g_movdqu_xmm0_load_abs(a, DATA_GPA);
	g_mov_r64(a, RBX, R0 + 0x100);
	g_movdqu_store_rbx_xmm0(a);			/* 16-byte MMIO write */
	g_mov_r64(a, RBX, R0 + 0x208);
	g_movdqu_xmm1_load_rbx(a);			/* 16-byte MMIO read */
	g_movdqu_store_abs_xmm1(a, DATA_GPA + 0x20);
	g_hlt(a);
}

static void gb_partial(struct asmb *a)
{
	g_mmio_w(a, PA + 2, 4, 0x00000000CAFEBABEULL);	/* half outside -> VMM */
	g_mmio_r(a, PA + 2, 4, 0);			/* half outside -> VMM */
	g_mmio_w(a, PA, 4, 0x0000000001020304ULL);	/* inside -> device */
	g_mmio_w(a, PB, 8, 0x1122334455667788ULL);	/* spans 2 regions -> VMM */
	g_pio_w(a, PIO_P, 2, 0xBEEF);			/* 2 ports, region has 1 */
	g_pio_r(a, PIO_P, 4, 1);
	g_hlt(a);
}

static void gb_fail3(struct asmb *a)
{
	g_mmio_r(a, R0 + 0x40, 4, 0);
	g_mmio_w(a, R0 + 0x48, 2, 0x5555);
	g_mmio_r(a, R0 + 0x50, 4, 1);
	g_hlt(a);
}

/* one 4-byte read at R0+0x40 into slot 0; g_lbl = offset right after the load */
static void gb_read1(struct asmb *a)
{
	g_mov_r64(a, RBX, R0 + 0x40);
	g_xor_eax(a);
	g_load_rbx(a, 4);
	g_lbl = a->n;
	g_save_rax(a, 0);
	g_hlt(a);
}

static void gb_pio_sync(struct asmb *a)
{
	g_pio_w(a, PIO_W, 4, 0xFFFFFFFF600DF00DULL);
	g_sync(a);
	g_hlt(a);
}

static void gb_deassign(struct asmb *a)
{
	g_mmio_r(a, R0 + 0x10, 4, 0);
	g_mmio_r(a, R0 + 0x10, 4, 1);
	g_hlt(a);
}

static void gb_after(struct asmb *a)
{
	g_mmio_w(a, R0 + 0x8, 4, 0x000000000BADCAFEULL);
	g_mmio_r(a, R0 + 0xC, 4, 0);
	g_pio_w(a, PIO_D + 1, 1, 0x77);
	g_pio_r(a, PIO_D + 2, 2, 1);
	g_hlt(a);
}

static const struct { const char *name; guest_fn fn; } guests[] = {
	{ "mmio_fmt", gb_mmio_fmt }, { "pio_fmt", gb_pio_fmt }, { "two", gb_two },
	{ "nonposted", gb_nonposted }, { "posted", gb_posted }, { "zero", gb_zero },
	{ "string", gb_string }, { "cross", gb_cross }, { "sse16", gb_sse16 },
	{ "partial", gb_partial }, { "fail3", gb_fail3 }, { "read1", gb_read1 },
	{ "pio_sync", gb_pio_sync }, { "deassign", gb_deassign }, { "after", gb_after },
};

/* ------------------------------------------------------------------ */
/* Checks: capability and argument errors                               */
/* ------------------------------------------------------------------ */
#define RB(i)	(MMIO_BASE + (uint64_t)(i) * 0x10000)	/* distinct MMIO ranges */
#define PIOF	KVM_IOREGION_PIO
#define POSTED	KVM_IOREGION_POSTED_WRITES
#define DEASSIGN KVM_IOREGION_DEASSIGN

static void c_cap(void)
{
	int kvm = open(KVM_DEV, O_RDWR | O_CLOEXEC);
	int r;

	if (kvm < 0) {
		failf("open /dev/kvm: %s", strerror(errno));
		return;
	}
	r = ioctl(kvm, KVM_CHECK_EXTENSION, KVM_CAP_IOREGIONFD);
	if (r <= 0)
		failf("KVM_CHECK_EXTENSION(KVM_CAP_IOREGIONFD=%d) returned %d (%s), doc: > 0 when the kernel has KVM_SET_IOREGION",
		      KVM_CAP_IOREGIONFD, r, r < 0 ? en(errno) : "not available");
}

static void c_einval(void)
{
	struct vm vm;
	int s[2];
	struct {
		const char *what;
		uint64_t gpa, size;
		uint32_t flags;
		int padi;
		int exp;
	} cs[] = {
		{ "unknown flag bit 3", RB(0), 0x100, 1u << 3, -1, EINVAL },
		{ "unknown flag bit 31", RB(1), 0x100, 1u << 31, -1, EINVAL },
		{ "pad[0] != 0", RB(2), 0x100, 0, 0, EINVAL },
		{ "pad[27] != 0", RB(3), 0x100, 0, 27, EINVAL },
		{ "memory_size 0 without POSTED_WRITES", RB(4), 0, 0, -1, EINVAL },
		{ "PIO memory_size 0 without POSTED_WRITES", 0x900, 0, PIOF, -1, EINVAL },
		{ "memory_size 2^31", 0x200000000ULL, 1ULL << 31, 0, -1, EINVAL },
		{ "memory_size 2^32+0x1000", 0x400000000ULL, (1ULL << 32) + 0x1000, 0, -1, EINVAL },
		{ "range 0xfffffffffffff000+0x2000 wraps around", 0xFFFFFFFFFFFFF000ULL, 0x2000, 0, -1, EINVAL },
		{ "PIO range 0xfff0+0x11 ends beyond port 0xffff", 0xFFF0, 0x11, PIOF, -1, EINVAL },
		{ "PIO range starting at 0x10000", 0x10000, 1, PIOF, -1, EINVAL },
		{ "PIO range 0xfff0+0x10 (ends at port 0xffff) is valid", 0xFFF0, 0x10, PIOF, -1, 0 },
		{ "memory_size 2^31-1 is valid", 0x100000000ULL, (1ULL << 31) - 1, 0, -1, 0 },
		{ "memory_size 0 with POSTED_WRITES is valid", RB(5), 0, POSTED, -1, 0 },
	};
	char what[160];

	if (!vm_create(&vm) || !seqpair(s))
		return;
	for (size_t i = 0; i < ARRAY_SIZE(cs); i++) {
		struct kvm_ioregion r;
		int ret;

		memset(&r, 0, sizeof(r));
		r.guest_paddr = cs[i].gpa;
		r.memory_size = cs[i].size;
		r.user_data = i;
		r.read_fd = r.write_fd = s[0];
		r.flags = cs[i].flags;
		if (cs[i].padi >= 0)
			r.pad[cs[i].padi] = 1;
		ret = ioctl(vm.fd, KVM_SET_IOREGION, &r) ? errno : 0;
		snprintf(what, sizeof(what), "%s", cs[i].what);
		want(what, ret, cs[i].exp);
		if (ret == 0 && !(cs[i].flags & ~(PIOF | POSTED)))	/* clean up */
			ior(vm.fd, cs[i].gpa, cs[i].size, 0, s[0], s[0],
			    (cs[i].flags & (PIOF | POSTED)) | DEASSIGN);
	}
	want("NULL parameter pointer", ioctl(vm.fd, KVM_SET_IOREGION, NULL) ? errno : 0, EFAULT);
}

static void c_ebadf(void)
{
	struct vm vm;
	int s[2], closed;

	if (!vm_create(&vm) || !seqpair(s))
		return;
	closed = eventfd(0, EFD_CLOEXEC);
	close(closed);
	want("read_fd = -1", ior(vm.fd, RB(0), 0x100, 0, -1, s[0], 0), EBADF);
	want("write_fd = -1", ior(vm.fd, RB(1), 0x100, 0, s[0], -1, 0), EBADF);
	want("write_fd is a closed descriptor number", ior(vm.fd, RB(2), 0x100, 0, s[0], closed, 0), EBADF);
	want("read_fd and write_fd closed", ior(vm.fd, RB(3), 0x100, 0, closed, closed, 0), EBADF);
}

static void c_enotsock(void)
{
	struct vm vm;
	int s[2], p[2], efd, nul;

	if (!vm_create(&vm) || !seqpair(s))
		return;
	if (pipe(p)) {
		failf("pipe: %s", strerror(errno));
		return;
	}
	efd = eventfd(0, EFD_CLOEXEC);
	nul = open("/dev/null", O_RDWR | O_CLOEXEC);
	want("read_fd is a pipe", ior(vm.fd, RB(0), 0x100, 0, p[0], s[0], 0), ENOTSOCK);
	want("write_fd is an eventfd", ior(vm.fd, RB(1), 0x100, 0, s[0], efd, 0), ENOTSOCK);
	want("both are /dev/null", ior(vm.fd, RB(2), 0x100, 0, nul, nul, 0), ENOTSOCK);
	want("both are the VM fd", ior(vm.fd, RB(3), 0x100, 0, vm.fd, vm.fd, 0), ENOTSOCK);
}

/* A connected TCP socket over loopback, or -1. */
static int tcp_connected(void)
{
	struct sockaddr_in a;
	socklen_t al = sizeof(a);
	int l, c;

	l = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (l < 0)
		return -1;
	memset(&a, 0, sizeof(a));
	a.sin_family = AF_INET;
	a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
	if (bind(l, (struct sockaddr *)&a, sizeof(a)) || listen(l, 1) ||
	    getsockname(l, (struct sockaddr *)&a, &al))
		return -1;
	c = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (c < 0 || connect(c, (struct sockaddr *)&a, sizeof(a)))
		return -1;
	if (accept(l, NULL, NULL) < 0)	/* keep the accepted end open */
		return -1;
	return c;
}

static void c_eprototype(void)
{
	struct vm vm;
	int s[2], st[2], dg[2], tcp;

	if (!vm_create(&vm) || !seqpair(s))
		return;
	if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, st) ||
	    socketpair(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0, dg)) {
		failf("socketpair: %s", strerror(errno));
		return;
	}
	want("AF_UNIX SOCK_STREAM pair", ior(vm.fd, RB(0), 0x100, 0, st[0], st[0], 0), EPROTOTYPE);
	want("AF_UNIX SOCK_DGRAM pair", ior(vm.fd, RB(1), 0x100, 0, dg[0], dg[0], 0), EPROTOTYPE);
	want("read_fd SEQPACKET, write_fd AF_UNIX SOCK_STREAM",
	     ior(vm.fd, RB(2), 0x100, 0, s[0], st[1], 0), EPROTOTYPE);
	tcp = tcp_connected();
	if (tcp >= 0)
		want("connected AF_INET TCP socket", ior(vm.fd, RB(3), 0x100, 0, tcp, tcp, 0), EPROTOTYPE);
	else
		snprintf(g_note, sizeof(g_note), " (TCP loopback unavailable: that sub-case skipped)");
}

static void c_enotconn(void)
{
	struct vm vm;
	int s[2], u, l;
	struct sockaddr_un sa;
	socklen_t sl;

	if (!vm_create(&vm) || !seqpair(s))
		return;
	u = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0);
	l = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0);
	memset(&sa, 0, sizeof(sa));
	sa.sun_family = AF_UNIX;
	snprintf(sa.sun_path + 1, sizeof(sa.sun_path) - 1, "ioregion-conf-%d", (int)getpid());
	sl = offsetof(struct sockaddr_un, sun_path) + 1 + strlen(sa.sun_path + 1);
	if (u < 0 || l < 0 || bind(l, (struct sockaddr *)&sa, sl) || listen(l, 1)) {
		failf("socket setup: %s", strerror(errno));
		return;
	}
	want("unconnected AF_UNIX SOCK_SEQPACKET socket", ior(vm.fd, RB(0), 0x100, 0, u, u, 0), ENOTCONN);
	want("listening AF_UNIX SOCK_SEQPACKET socket", ior(vm.fd, RB(1), 0x100, 0, l, l, 0), ENOTCONN);
	want("read_fd connected, write_fd unconnected", ior(vm.fd, RB(2), 0x100, 0, s[0], u, 0), ENOTCONN);
}

static void c_ebusy(void)
{
	struct vm v1, v2;
	int a[2], b[2], c[2], da;

	if (!vm_create(&v1) || !vm_create(&v2) || !seqpair(a) || !seqpair(b) || !seqpair(c))
		return;
	if (!ior_ok(v1.fd, "VM1 region on pair (a,a)", RB(0), 0x100, 1, a[0], a[0], 0))
		return;
	want("VM1: second region naming the same pair (a,a) (doc: regions naming the same pair share it)",
	     ior(v1.fd, RB(1), 0x100, 2, a[0], a[0], 0), 0);
	da = dup(a[0]);
	want("VM1: region naming socket a through a dup()ed descriptor (same socket, same pair)",
	     ior(v1.fd, RB(2), 0x100, 3, da, da, 0), 0);
	want("VM1: region (read a, write b): a already serves pair (a,a)",
	     ior(v1.fd, RB(3), 0x100, 4, a[0], b[0], 0), EBUSY);
	want("VM1: region (read b, write a)", ior(v1.fd, RB(4), 0x100, 5, b[0], a[0], 0), EBUSY);
	want("VM1: region (b,b), b not in use yet", ior(v1.fd, RB(5), 0x100, 6, b[0], b[0], 0), 0);
	want("VM2: region (a,a), a serves VM1", ior(v2.fd, RB(0), 0x100, 7, a[0], a[0], 0), EBUSY);
	want("VM2: region (read c, write b), b serves VM1", ior(v2.fd, RB(1), 0x100, 8, c[0], b[0], 0), EBUSY);
	want("VM2: region (c,c), c unused", ior(v2.fd, RB(2), 0x100, 9, c[0], c[0], 0), 0);
}

static void c_eexist_ioregion(void)
{
	struct vm vm;
	int s[2];
	const uint64_t B = MMIO_BASE;

	if (!vm_create(&vm) || !seqpair(s))
		return;
	if (!ior_ok(vm.fd, "region [B, B+0x100)", B, 0x100, 0, s[0], s[0], 0))
		return;
	want("[B+0xff, +2) overlaps the last byte", ior(vm.fd, B + 0xFF, 2, 0, s[0], s[0], 0), EEXIST);
	want("[B-0x10, +0x20) overlaps the first bytes", ior(vm.fd, B - 0x10, 0x20, 0, s[0], s[0], 0), EEXIST);
	want("[B-0x100, +0x300) covers it", ior(vm.fd, B - 0x100, 0x300, 0, s[0], s[0], 0), EEXIST);
	want("[B+0x40, +0x10) inside it", ior(vm.fd, B + 0x40, 0x10, 0, s[0], s[0], 0), EEXIST);
	want("the same range again", ior(vm.fd, B, 0x100, 0, s[0], s[0], 0), EEXIST);
	want("[B+0x100, +0x100) adjacent above", ior(vm.fd, B + 0x100, 0x100, 0, s[0], s[0], 0), 0);
	want("[B-0x100, +0x100) adjacent below", ior(vm.fd, B - 0x100, 0x100, 0, s[0], s[0], 0), 0);
	/* same numbers on the two buses (this VM has no memslot) */
	if (!ior_ok(vm.fd, "MMIO region [0x800, 0x810)", 0x800, 0x10, 0, s[0], s[0], 0))
		return;
	want("PIO region [0x800, 0x810) on the other bus", ior(vm.fd, 0x800, 0x10, 0, s[0], s[0], PIOF), 0);
	want("PIO region [0x808, 0x809) overlapping a PIO region", ior(vm.fd, 0x808, 1, 0, s[0], s[0], PIOF), EEXIST);
	want("PIO region [0x810, 0x811) adjacent", ior(vm.fd, 0x810, 1, 0, s[0], s[0], PIOF), 0);
}

static void c_eexist_ioeventfd(void)
{
	struct vm vm;
	int s[2];
	const uint64_t E = MMIO_BASE + 0x300000, F = E + 0x1000;

	if (!vm_create(&vm) || !seqpair(s))
		return;
	/* ioeventfd first, then ioregion */
	if (!want("setup: KVM_IOEVENTFD MMIO [E+8, +4)", mk_ioeventfd(vm.fd, E + 8, 4, 0), 0))
		return;
	want("KVM_SET_IOREGION [E, E+0x10) over an ioeventfd", ior(vm.fd, E, 0x10, 0, s[0], s[0], 0), EEXIST);
	want("KVM_SET_IOREGION [E+0xc, +4) adjacent above the ioeventfd", ior(vm.fd, E + 0xC, 4, 0, s[0], s[0], 0), 0);
	want("KVM_SET_IOREGION [E+4, +4) adjacent below the ioeventfd", ior(vm.fd, E + 4, 4, 0, s[0], s[0], 0), 0);
	/* ioregion first, then ioeventfd */
	if (!ior_ok(vm.fd, "region [F, F+0x10)", F, 0x10, 0, s[0], s[0], 0))
		return;
	want("KVM_IOEVENTFD [F+0xc, +8) partly over the region", mk_ioeventfd(vm.fd, F + 0xC, 8, 0), EEXIST);
	want("KVM_IOEVENTFD zero-length at F+4 (inside the region)", mk_ioeventfd(vm.fd, F + 4, 0, 0), EEXIST);
	want("KVM_IOEVENTFD [F+0x10, +8) adjacent", mk_ioeventfd(vm.fd, F + 0x10, 8, 0), 0);
	want("KVM_IOEVENTFD zero-length at F+0x20 (outside)", mk_ioeventfd(vm.fd, F + 0x20, 0, 0), 0);
	/* PIO bus, both ways */
	if (!want("setup: KVM_IOEVENTFD PIO [0x320, +2)", mk_ioeventfd(vm.fd, 0x320, 2, 1), 0))
		return;
	want("KVM_SET_IOREGION PIO [0x321, +1) over a PIO ioeventfd", ior(vm.fd, 0x321, 1, 0, s[0], s[0], PIOF), EEXIST);
	if (!ior_ok(vm.fd, "PIO region [0x330, +4)", 0x330, 4, 0, s[0], s[0], PIOF))
		return;
	want("KVM_IOEVENTFD PIO [0x333, +1) inside a PIO region", mk_ioeventfd(vm.fd, 0x333, 1, 1), EEXIST);
}

static void c_eexist_coalesced(void)
{
	struct vm vm;
	int s[2];
	const uint64_t C = MMIO_BASE + 0x100000, D = MMIO_BASE + 0x200000;

	if (!vm_create(&vm) || !seqpair(s))
		return;
	if (ioctl(vm.kvm, KVM_CHECK_EXTENSION, KVM_CAP_COALESCED_MMIO) <= 0) {
		failf("KVM_CAP_COALESCED_MMIO not available, cannot test");
		return;
	}
	if (!want("setup: coalesced MMIO zone [C, C+0x1000)", mk_zone(vm.fd, C, 0x1000, 0), 0))
		return;
	want("KVM_SET_IOREGION [C+0xff0, +0x20) partly over a coalesced zone",
	     ior(vm.fd, C + 0xFF0, 0x20, 0, s[0], s[0], 0), EEXIST);
	want("KVM_SET_IOREGION [C+0x1000, +0x100) adjacent to the zone",
	     ior(vm.fd, C + 0x1000, 0x100, 0, s[0], s[0], 0), 0);
	if (!ior_ok(vm.fd, "region [D, D+0x100)", D, 0x100, 0, s[0], s[0], 0))
		return;
	want("KVM_REGISTER_COALESCED_MMIO [D+0x80, +0x100) partly over a region", mk_zone(vm.fd, D + 0x80, 0x100, 0), EEXIST);
	want("KVM_REGISTER_COALESCED_MMIO [D-0x10, +0x20) partly over a region", mk_zone(vm.fd, D - 0x10, 0x20, 0), EEXIST);
	want("KVM_REGISTER_COALESCED_MMIO [D+0x100, +0x100) adjacent", mk_zone(vm.fd, D + 0x100, 0x100, 0), 0);
	if (ioctl(vm.kvm, KVM_CHECK_EXTENSION, KVM_CAP_COALESCED_PIO) <= 0) {
		snprintf(g_note, sizeof(g_note), " (no KVM_CAP_COALESCED_PIO: PIO sub-cases skipped)");
		return;
	}
	if (!want("setup: coalesced PIO zone [0x200, +8)", mk_zone(vm.fd, 0x200, 8, 1), 0))
		return;
	want("KVM_SET_IOREGION PIO [0x207, +1) over a coalesced PIO zone",
	     ior(vm.fd, 0x207, 1, 0, s[0], s[0], PIOF), EEXIST);
	if (!ior_ok(vm.fd, "PIO region [0x300, +4)", 0x300, 4, 0, s[0], s[0], PIOF))
		return;
	want("KVM_REGISTER_COALESCED_MMIO pio [0x302, +2) over a PIO region", mk_zone(vm.fd, 0x302, 2, 1), EEXIST);
}

static void c_eexist_irqchip(void)
{
	struct vm v1, v2, v3;
	int s[2], t[2], u[2];

	if (!vm_create(&v1) || !vm_create(&v2) || !vm_create(&v3) ||
	    !seqpair(s) || !seqpair(t) || !seqpair(u))
		return;
	if (!want("setup: KVM_CREATE_IRQCHIP", mk_irqchip(v1.fd), 0))
		return;
	want("PIO region [0x20, +2) over the master PIC", ior(v1.fd, 0x20, 2, 0, s[0], s[0], PIOF), EEXIST);
	want("PIO region [0x1f, +2) over the master PIC's first port", ior(v1.fd, 0x1F, 2, 0, s[0], s[0], PIOF), EEXIST);
	want("PIO region [0xa1, +1) over the slave PIC", ior(v1.fd, 0xA1, 1, 0, s[0], s[0], PIOF), EEXIST);
	want("MMIO region [0xfec00000, +0x100) over the IOAPIC", ior(v1.fd, 0xFEC00000ULL, 0x100, 0, s[0], s[0], 0), EEXIST);
	want("MMIO region [0xfec00010, +4) inside the IOAPIC", ior(v1.fd, 0xFEC00010ULL, 4, 0, s[0], s[0], 0), EEXIST);
	/* reverse direction: the irqchip after a region */
	if (ior_ok(v2.fd, "VM2: PIO region [0xa0, +1)", 0xA0, 1, 0, t[0], t[0], PIOF))
		want("VM2: KVM_CREATE_IRQCHIP with an ioregion on a PIC port", mk_irqchip(v2.fd), EEXIST);
	if (ior_ok(v3.fd, "VM3: MMIO region [0xfec00040, +4)", 0xFEC00040ULL, 4, 0, u[0], u[0], 0))
		want("VM3: KVM_CREATE_IRQCHIP with an ioregion inside the IOAPIC", mk_irqchip(v3.fd), EEXIST);
}

static void c_eexist_pit(void)
{
	struct vm v[4];
	int s[4][2];

	for (int i = 0; i < 4; i++) {
		if (!vm_create(&v[i]) || !seqpair(s[i]))
			return;
		if (!want("setup: KVM_CREATE_IRQCHIP", mk_irqchip(v[i].fd), 0))
			return;
	}
	/* PIT first */
	if (want("VM1 setup: KVM_CREATE_PIT2 flags=0", mk_pit(v[0].fd, 0), 0)) {
		want("VM1: PIO region [0x40, +1) over the PIT", ior(v[0].fd, 0x40, 1, 0, s[0][0], s[0][0], PIOF), EEXIST);
		want("VM1: PIO region [0x43, +2) over the PIT's last port", ior(v[0].fd, 0x43, 2, 0, s[0][0], s[0][0], PIOF), EEXIST);
		want("VM1: PIO region [0x61, +1), PIT without KVM_PIT_SPEAKER_DUMMY",
		     ior(v[0].fd, 0x61, 1, 0, s[0][0], s[0][0], PIOF), 0);
	}
	if (want("VM2 setup: KVM_CREATE_PIT2 flags=KVM_PIT_SPEAKER_DUMMY", mk_pit(v[1].fd, KVM_PIT_SPEAKER_DUMMY), 0)) {
		want("VM2: PIO region [0x61, +1) over the dummy speaker", ior(v[1].fd, 0x61, 1, 0, s[1][0], s[1][0], PIOF), EEXIST);
		want("VM2: PIO region [0x64, +1) over the dummy speaker's last port", ior(v[1].fd, 0x64, 1, 0, s[1][0], s[1][0], PIOF), EEXIST);
	}
	/* region first */
	if (ior_ok(v[2].fd, "VM3: PIO region [0x42, +1)", 0x42, 1, 0, s[2][0], s[2][0], PIOF))
		want("VM3: KVM_CREATE_PIT2 with an ioregion on port 0x42", mk_pit(v[2].fd, 0), EEXIST);
	if (ior_ok(v[3].fd, "VM4: PIO region [0x62, +1)", 0x62, 1, 0, s[3][0], s[3][0], PIOF))
		want("VM4: KVM_CREATE_PIT2(KVM_PIT_SPEAKER_DUMMY) with an ioregion on port 0x62",
		     mk_pit(v[3].fd, KVM_PIT_SPEAKER_DUMMY), EEXIST);
}

static void c_enoent(void)
{
	struct vm vm;
	int s[2], t[2];
	const uint64_t B = MMIO_BASE;

	if (!vm_create(&vm) || !seqpair(s) || !seqpair(t))
		return;
	if (!ior_ok(vm.fd, "MMIO region [B, +0x100)", B, 0x100, UD, s[0], s[0], 0) ||
	    !ior_ok(vm.fd, "PIO region [0x300, +8)", 0x300, 8, UD, s[0], s[0], PIOF) ||
	    !ior_ok(vm.fd, "MMIO region [0x400, +0x10)", 0x400, 0x10, UD, s[0], s[0], 0) ||
	    !ior_ok(vm.fd, "zero-size posted MMIO region at B+0x1000", B + 0x1000, 0, UD, s[0], s[0], POSTED))
		return;
	want("DEASSIGN (B, 0x80): smaller size", ior(vm.fd, B, 0x80, UD, s[0], s[0], DEASSIGN), ENOENT);
	want("DEASSIGN (B, 0x200): larger size", ior(vm.fd, B, 0x200, UD, s[0], s[0], DEASSIGN), ENOENT);
	want("DEASSIGN (B+0x10, 0x100): other address", ior(vm.fd, B + 0x10, 0x100, UD, s[0], s[0], DEASSIGN), ENOENT);
	want("DEASSIGN MMIO (0x300, 8): the region is on the PIO bus", ior(vm.fd, 0x300, 8, UD, s[0], s[0], DEASSIGN), ENOENT);
	want("DEASSIGN PIO (0x400, 0x10): the region is on the MMIO bus", ior(vm.fd, 0x400, 0x10, UD, s[0], s[0], PIOF | DEASSIGN), ENOENT);
	want("DEASSIGN (B, 0x100) naming other sockets and another user_data (not compared)",
	     ior(vm.fd, B, 0x100, UD2, t[0], t[0], DEASSIGN), 0);
	want("DEASSIGN (B, 0x100) a second time", ior(vm.fd, B, 0x100, UD, s[0], s[0], DEASSIGN), ENOENT);
	want("DEASSIGN PIO (0x300, 8)", ior(vm.fd, 0x300, 8, UD, s[0], s[0], PIOF | DEASSIGN), 0);
	want("DEASSIGN zero-size posted region at B+0x1000", ior(vm.fd, B + 0x1000, 0, UD, s[0], s[0], POSTED | DEASSIGN), 0);
	want("re-assign (B, 0x100) on the same pair after DEASSIGN", ior(vm.fd, B, 0x100, UD, s[0], s[0], 0), 0);
}

/* ------------------------------------------------------------------ */
/* Checks: the data path                                                */
/* ------------------------------------------------------------------ */

/* Common setup: VM with guest program g, one socket pair, one region. */
struct tc {
	struct vm vm;
	int s[2];	/* s[0]: KVM's end, s[1]: device end */
	struct dev d;
};

static int tc_setup(struct tc *t, guest_fn g, uint64_t gpa, uint64_t size, uint64_t ud,
		    uint32_t flags, hook_fn hook)
{
	if (!vm_guest(&t->vm, g) || !seqpair(t->s))
		return 0;
	if (!ior_ok(t->vm.fd, "region", gpa, size, ud, t->s[0], t->s[0], flags))
		return 0;
	dev_init(&t->d, t->s[1], t->s[1], hook);
	t->d.vmfd = t->vm.fd;
	t->d.kfd = t->s[0];
	return 1;
}

static void check_slot(struct vm *vm, int i, uint64_t exp, const char *what)
{
	uint64_t v = slot(vm, i);

	if (v != exp)
		failf("%s: guest got 0x%llx, expected 0x%llx%s", what, (unsigned long long)v,
		      (unsigned long long)exp, v == SENTINEL ? " (guest never stored it)" : "");
}

static int hlt_clean(struct vm *vm, const char *what)
{
	if (!expect_hlt(vm, what))
		return 0;
	if (vm->run->flags & PENDING) {
		failf("%s: KVM_EXIT_HLT with KVM_RUN_X86_IOREGIONFD_PENDING set, doc: set only while an ioregion access is not finished",
		      what);
		return 0;
	}
	return 1;
}

static void c_mmio_fmt(void)
{
	struct tc t;
	char what[128];
	int n = ARRAY_SIZE(mmio_w) + ARRAY_SIZE(mmio_r);

	if (!tc_setup(&t, gb_mmio_fmt, R0, 0x1000, UD, 0, NULL))
		return;
	close(t.s[0]);	/* doc: KVM takes its own references */
	if (!dev_start(&t.d) || !hlt_clean(&t.vm, "guest doing MMIO writes and reads"))
		return;
	if (!dev_expect_n(&t.d, n, "MMIO accesses"))
		return;
	for (size_t i = 0; i < ARRAY_SIZE(mmio_w); i++)
		cmd_is(&t.d.log[i], i, KVM_IOREGIONFD_CMD_WRITE, mmio_w[i].size, 1, UD,
		       mmio_w[i].off, mmio_w[i].rax & mask(mmio_w[i].size));
	for (size_t i = 0; i < ARRAY_SIZE(mmio_r); i++) {
		int k = ARRAY_SIZE(mmio_w) + i;

		cmd_is(&t.d.log[k], k, KVM_IOREGIONFD_CMD_READ, mmio_r[i].size, 1, UD,
		       mmio_r[i].off, 0);
		snprintf(what, sizeof(what), "%d-byte read at offset 0x%llx (low bytes of the response)",
			 mmio_r[i].size, (unsigned long long)mmio_r[i].off);
		check_slot(&t.vm, i, dev_val(UD, mmio_r[i].off) & mask(mmio_r[i].size), what);
	}
}

static void c_pio_fmt(void)
{
	struct tc t;
	char what[128];
	int n = ARRAY_SIZE(pio_w) + ARRAY_SIZE(pio_r);

	if (!tc_setup(&t, gb_pio_fmt, PIO_A, 8, UD, PIOF, NULL))
		return;
	if (!dev_start(&t.d) || !hlt_clean(&t.vm, "guest doing OUT and IN"))
		return;
	if (!dev_expect_n(&t.d, n, "PIO accesses"))
		return;
	for (size_t i = 0; i < ARRAY_SIZE(pio_w); i++)
		cmd_is(&t.d.log[i], i, KVM_IOREGIONFD_CMD_WRITE, pio_w[i].size, 1, UD,
		       pio_w[i].off, pio_w[i].rax & mask(pio_w[i].size));
	for (size_t i = 0; i < ARRAY_SIZE(pio_r); i++) {
		int k = ARRAY_SIZE(pio_w) + i;

		cmd_is(&t.d.log[k], k, KVM_IOREGIONFD_CMD_READ, pio_r[i].size, 1, UD, pio_r[i].off, 0);
		snprintf(what, sizeof(what), "%d-byte IN at port 0x%x (low bytes of the response)",
			 pio_r[i].size, PIO_A + pio_r[i].off);
		check_slot(&t.vm, i, dev_val(UD, pio_r[i].off) & mask(pio_r[i].size), what);
	}
}

static void c_two(void)
{
	struct vm vm;
	struct dev d;
	int sr[2], sw[2];	/* sr: responses (read_fd), sw: commands (write_fd) */
	char buf[64];
	ssize_t n;

	if (!vm_guest(&vm, gb_two) || !seqpair(sr) || !seqpair(sw))
		return;
	if (!ior_ok(vm.fd, "region 1", R0, 0x100, UD2, sr[0], sw[0], 0) ||
	    !ior_ok(vm.fd, "region 2 on the same pair", R0 + 0x1000, 0x100, UD3, sr[0], sw[0], 0))
		return;
	close(sr[0]);
	close(sw[0]);
	dev_init(&d, sw[1], sr[1], NULL);
	if (!dev_start(&d) || !hlt_clean(&vm, "guest accessing two regions"))
		return;
	if (!dev_expect_n(&d, 3, "accesses to two regions"))
		return;
	cmd_is(&d.log[0], 0, KVM_IOREGIONFD_CMD_WRITE, 4, 1, UD2, 0x8, 0x12345678);
	cmd_is(&d.log[1], 1, KVM_IOREGIONFD_CMD_READ, 2, 1, UD3, 0x20, 0);
	cmd_is(&d.log[2], 2, KVM_IOREGIONFD_CMD_READ, 4, 1, UD2, 0x10, 0);
	check_slot(&vm, 0, dev_val(UD3, 0x20) & 0xffff, "read from region 2");
	check_slot(&vm, 1, dev_val(UD2, 0x10) & 0xffffffff, "read from region 1");
	n = recv(sr[1], buf, sizeof(buf), MSG_DONTWAIT);
	if (n >= 0)
		failf("KVM sent a %zd-byte message on read_fd's socket; doc: commands go to write_fd", n);
}

static int hook_slow_write(struct dev *d, const struct kvm_ioregionfd_cmd *c, int idx)
{
	(void)idx;
	if (c->cmd != KVM_IOREGIONFD_CMD_WRITE)
		return ACT_RESPOND;
	msleep(300);
	__atomic_store_n(&d->flag, 1, __ATOMIC_SEQ_CST);	/* before the response */
	dev_send_resp(d, 0);
	return ACT_NONE;
}

static void c_nonposted(void)
{
	struct tc t;
	long long t0;

	if (!tc_setup(&t, gb_nonposted, R0, 0x100, UD, 0, hook_slow_write) || !dev_start(&t.d))
		return;
	t0 = now_ms();
	if (!expect_sync(&t.vm, "non-posted write answered after 300 ms"))
		return;
	if (!__atomic_load_n(&t.d.flag, __ATOMIC_SEQ_CST))
		failf("the guest went past a non-posted write %lld ms later, before the device task answered; doc: writes wait for the response unless KVM_IOREGION_POSTED_WRITES",
		      now_ms() - t0);
	if (dev_expect_n(&t.d, 1, "non-posted write"))
		cmd_is(&t.d.log[0], 0, KVM_IOREGIONFD_CMD_WRITE, 4, 1, UD, 4, 0xA5A5A5A5);
	hlt_clean(&t.vm, "after the write");
}

static void c_posted(void)
{
	struct tc t;

	if (!tc_setup(&t, gb_posted, R0, 0x100, UD, POSTED, NULL))
		return;
	t.d.gate = 1;	/* the device task does not read at all for now */
	if (!dev_start(&t.d))
		return;
	if (!expect_sync(&t.vm, "posted writes while the device task reads nothing"))
		return;
	if (dev_n(&t.d) != 0)
		failf("internal: device read while gated");
	t.d.gate = 0;
	dev_wait(&t.d, 3, DEV_WAIT_MS);
	if (dev_n(&t.d) < 3) {
		failf("the device task found %d posted write command(s) in the socket, expected 3", dev_n(&t.d));
		return;
	}
	for (size_t i = 0; i < ARRAY_SIZE(posted_w); i++)
		cmd_is(&t.d.log[i], i, KVM_IOREGIONFD_CMD_WRITE, posted_w[i].size, 0, UD,
		       posted_w[i].off, posted_w[i].rax & mask(posted_w[i].size));
	if (!hlt_clean(&t.vm, "read from a posted-writes region"))
		return;
	if (dev_expect_n(&t.d, 4, "posted writes + read"))
		cmd_is(&t.d.log[3], 3, KVM_IOREGIONFD_CMD_READ, 4, 1, UD, 0x20, 0);
	check_slot(&t.vm, 0, dev_val(UD, 0x20) & 0xffffffff, "read from a posted-writes region");
}

static void fill_data16(struct vm *vm, uint64_t *lo, uint64_t *hi)
{
	for (int i = 0; i < 16; i++)
		vm->mem[DATA_GPA + i] = 0xA0 + i;
	memcpy(lo, vm->mem + DATA_GPA, 8);
	memcpy(hi, vm->mem + DATA_GPA + 8, 8);
}

static void c_zero(void)
{
	struct tc t;
	uint64_t lo, hi;

	if (!tc_setup(&t, gb_zero, ZA, 0, UD, POSTED, NULL))
		return;
	fill_data16(&t.vm, &lo, &hi);
	if (!dev_start(&t.d))
		return;
	if (!expect_mmio(&t.vm, "1-byte write at guest_paddr+1", ZA + 1, 1, 1, 0x66, 0) ||
	    !expect_mmio(&t.vm, "2-byte write at guest_paddr-1 (does not start at guest_paddr)", ZA - 1, 2, 1, 0x7788, 0) ||
	    !expect_mmio(&t.vm, "4-byte read at guest_paddr (reads go to the VMM)", ZA, 4, 0, 0, 0xCAFEF00D) ||
	    !expect_mmio(&t.vm, "bytes 8-15 of a 16-byte write at guest_paddr", ZA + 8, 8, 1, hi, 0) ||
	    !hlt_clean(&t.vm, "end of the zero-size region program"))
		return;
	check_slot(&t.vm, 0, 0xCAFEF00D, "read answered by the VMM");
	if (!dev_expect_n(&t.d, 3, "writes starting at guest_paddr"))
		return;
	cmd_is(&t.d.log[0], 0, KVM_IOREGIONFD_CMD_WRITE, 4, 0, UD, 0, 0x11223344);
	cmd_is(&t.d.log[1], 1, KVM_IOREGIONFD_CMD_WRITE, 1, 0, UD, 0, 0x55);
	cmd_is(&t.d.log[2], 2, KVM_IOREGIONFD_CMD_WRITE, 8, 0, UD, 0, lo);
}

static int hook_string(struct dev *d, const struct kvm_ioregionfd_cmd *c, int idx)
{
	(void)idx;
	if (c->cmd != KVM_IOREGIONFD_CMD_READ)
		return ACT_RESPOND;
	/* element k reads 0xC0+k; the upper bytes must be ignored */
	dev_send_resp(d, 0xABCDEF0000000000ULL | (0xC0 + d->counter++));
	return ACT_NONE;
}

static void c_string(void)
{
	struct tc t;
	const uint16_t words[3] = { 0xA1B2, 0xC3D4, 0xE5F6 };
	struct kvm_regs regs;

	if (!tc_setup(&t, gb_string, PIO_S, 4, UD, PIOF, hook_string))
		return;
	memcpy(t.vm.mem + DATA_GPA, words, sizeof(words));
	memset(t.vm.mem + DATA_GPA + 0x100, 0xEE, 8);
	if (!dev_start(&t.d) || !hlt_clean(&t.vm, "rep outsw + rep insb"))
		return;
	if (dev_expect_n(&t.d, 7, "rep outsw x3 + rep insb x4 (one command per element)")) {
		for (int i = 0; i < 3; i++)
			cmd_is(&t.d.log[i], i, KVM_IOREGIONFD_CMD_WRITE, 2, 1, UD, 2, words[i]);
		for (int i = 3; i < 7; i++)
			cmd_is(&t.d.log[i], i, KVM_IOREGIONFD_CMD_READ, 1, 1, UD, 1, 0);
	}
	for (int i = 0; i < 5; i++) {
		uint8_t exp = i < 4 ? 0xC0 + i : 0xEE, got = t.vm.mem[DATA_GPA + 0x100 + i];

		if (got != exp)
			failf("rep insb buffer byte %d: 0x%02x, expected 0x%02x", i, got, exp);
	}
	if (ioctl(t.vm.vcpu, KVM_GET_REGS, &regs) == 0 &&
	    (regs.rcx != 0 || regs.rsi != DATA_GPA + 6 || regs.rdi != DATA_GPA + 0x104))
		failf("after the string instructions rcx=0x%llx rsi=0x%llx rdi=0x%llx, expected 0, 0x%llx, 0x%llx",
		      (unsigned long long)regs.rcx, (unsigned long long)regs.rsi,
		      (unsigned long long)regs.rdi, DATA_GPA + 6, DATA_GPA + 0x104);
}

static void c_cross(void)
{
	struct tc t;
	static const struct { uint64_t off; int size; uint64_t data; } w[] = {
		{ 0xFFD, 2, 0x2211 }, { 0xFFF, 1, 0x33 }, { 0x1000, 4, 0x77665544 }, { 0x1004, 1, 0x88 },
	};
	static const struct { uint64_t off; int size; } r[] = { { 0xFFF, 1 }, { 0x1000, 2 }, { 0x1002, 1 } };
	uint64_t exp;

	if (!tc_setup(&t, gb_cross, R0, 0x2000, UD, 0, NULL))
		return;
	if (!dev_start(&t.d) || !hlt_clean(&t.vm, "page-crossing accesses"))
		return;
	if (dev_expect_n(&t.d, 7, "8-byte write at 0xffd (3+5 bytes) and 4-byte read at 0xfff (1+3 bytes)")) {
		for (int i = 0; i < 4; i++)
			cmd_is(&t.d.log[i], i, KVM_IOREGIONFD_CMD_WRITE, w[i].size, 1, UD, w[i].off, w[i].data);
		for (int i = 0; i < 3; i++)
			cmd_is(&t.d.log[4 + i], 4 + i, KVM_IOREGIONFD_CMD_READ, r[i].size, 1, UD, r[i].off, 0);
	}
	exp = (dev_val(UD, 0xFFF) & 0xff) | (dev_val(UD, 0x1000) & 0xffff) << 8 |
	      (dev_val(UD, 0x1002) & 0xff) << 24;
	check_slot(&t.vm, 0, exp, "page-crossing 4-byte read assembled from its pieces");
}

static void c_sse16(void)
{
	struct tc t;
	uint64_t lo, hi, got[2];

	if (!tc_setup(&t, gb_sse16, R0, 0x1000, UD, 0, NULL))
		return;
	fill_data16(&t.vm, &lo, &hi);
	if (!dev_start(&t.d) || !hlt_clean(&t.vm, "16-byte movdqu accesses"))
		return;
	if (dev_expect_n(&t.d, 4, "16-byte write and 16-byte read")) {
		cmd_is(&t.d.log[0], 0, KVM_IOREGIONFD_CMD_WRITE, 8, 1, UD, 0x100, lo);
		cmd_is(&t.d.log[1], 1, KVM_IOREGIONFD_CMD_WRITE, 8, 1, UD, 0x108, hi);
		cmd_is(&t.d.log[2], 2, KVM_IOREGIONFD_CMD_READ, 8, 1, UD, 0x208, 0);
		cmd_is(&t.d.log[3], 3, KVM_IOREGIONFD_CMD_READ, 8, 1, UD, 0x210, 0);
	}
	memcpy(got, t.vm.mem + DATA_GPA + 0x20, 16);
	if (got[0] != dev_val(UD, 0x208) || got[1] != dev_val(UD, 0x210))
		failf("16-byte read gave 0x%016llx:%016llx, expected 0x%016llx:%016llx (high:low)",
		      (unsigned long long)got[1], (unsigned long long)got[0],
		      (unsigned long long)dev_val(UD, 0x210), (unsigned long long)dev_val(UD, 0x208));
}

static void c_partial(void)
{
	struct tc t;

	if (!tc_setup(&t, gb_partial, PA, 4, UD, 0, NULL))
		return;
	if (!ior_ok(t.vm.fd, "region [PB, +4)", PB, 4, UD2, t.s[0], t.s[0], 0) ||
	    !ior_ok(t.vm.fd, "region [PB+4, +4)", PB + 4, 4, UD3, t.s[0], t.s[0], 0) ||
	    !ior_ok(t.vm.fd, "PIO region [0x700, +1)", PIO_P, 1, UD4, t.s[0], t.s[0], PIOF))
		return;
	if (!dev_start(&t.d))
		return;
	if (!expect_mmio(&t.vm, "4-byte write at region+2 (half outside)", PA + 2, 4, 1, 0xCAFEBABE, 0) ||
	    !expect_mmio(&t.vm, "4-byte read at region+2 (half outside)", PA + 2, 4, 0, 0, 0x11223344) ||
	    !expect_mmio(&t.vm, "8-byte write spanning two adjacent 4-byte regions", PB, 8, 1, 0x1122334455667788ULL, 0) ||
	    !expect_io(&t.vm, "2-byte OUT to a 1-port region", PIO_P, 2, KVM_EXIT_IO_OUT, 0xBEEF, 0) ||
	    !expect_io(&t.vm, "4-byte IN from a 1-port region", PIO_P, 4, KVM_EXIT_IO_IN, 0, 0x55667788) ||
	    !hlt_clean(&t.vm, "end of the partial-access program"))
		return;
	check_slot(&t.vm, 0, 0x11223344, "partial MMIO read answered by the VMM");
	check_slot(&t.vm, 1, 0x55667788, "partial IN answered by the VMM");
	if (dev_expect_n(&t.d, 1, "only the access fully inside a region"))
		cmd_is(&t.d.log[0], 0, KVM_IOREGIONFD_CMD_WRITE, 4, 1, UD, 0, 0x01020304);
}

/* ------------------------------------------------------------------ */
/* Checks: failures                                                     */
/* ------------------------------------------------------------------ */
static int hook_close(struct dev *d, const struct kvm_ioregionfd_cmd *c, int idx)
{
	(void)d; (void)c; (void)idx;
	return ACT_CLOSE;
}

static void c_epipe(void)
{
	struct tc t;

	if (!tc_setup(&t, gb_fail3, R0, 0x100, UD, 0, hook_close) || !dev_start(&t.d))
		return;
	if (!expect_failed(&t.vm, "4-byte read; the device task read the command and closed its socket",
			   R0 + 0x40, 4, 0, 0, UD, -EPIPE))
		return;
	if (!expect_failed(&t.vm, "next KVM_RUN: read completes as failed, then a 2-byte write to the failed region",
			   R0 + 0x48, 2, 1, 0, UD, 0))
		return;
	if (!expect_failed(&t.vm, "then a 4-byte read of the failed region", R0 + 0x50, 4, 0, 0, UD, 0))
		return;
	if (!hlt_clean(&t.vm, "after the failed read"))
		return;
	check_slot(&t.vm, 0, 0xFFFFFFFF, "first failed 4-byte read (doc: all ones)");
	check_slot(&t.vm, 1, 0xFFFFFFFF, "second failed 4-byte read (doc: all ones)");
}

static void c_econnreset(void)
{
	struct tc t;

	if (!tc_setup(&t, gb_read1, R0, 0x100, UD, 0, NULL))
		return;
	t.d.close_on_pollin = 1;
	if (!dev_start(&t.d))
		return;
	if (!expect_failed(&t.vm, "4-byte read; the device task closed its socket with the command unread",
			   R0 + 0x40, 4, 0, 0, UD, -ECONNRESET))
		return;
	if (hlt_clean(&t.vm, "after the failed read"))
		check_slot(&t.vm, 0, 0xFFFFFFFF, "failed 4-byte read (doc: all ones)");
}

static ssize_t send_with_fd(int fd, const void *buf, size_t len)
{
	union {
		char b[CMSG_SPACE(sizeof(int))];
		struct cmsghdr align;
	} u;
	struct iovec iov = { (void *)buf, len };
	struct msghdr m;
	struct cmsghdr *cm;
	int efd = eventfd(0, EFD_CLOEXEC);

	memset(&m, 0, sizeof(m));
	memset(&u, 0, sizeof(u));
	m.msg_iov = &iov;
	m.msg_iovlen = 1;
	m.msg_control = u.b;
	m.msg_controllen = sizeof(u.b);
	cm = CMSG_FIRSTHDR(&m);
	cm->cmsg_level = SOL_SOCKET;
	cm->cmsg_type = SCM_RIGHTS;
	cm->cmsg_len = CMSG_LEN(sizeof(int));
	memcpy(CMSG_DATA(cm), &efd, sizeof(int));
	return sendmsg(fd, &m, MSG_NOSIGNAL);
}

static const struct { const char *what; int len; } bad_resp[] = {
	{ "empty response", 0 },
	{ "40-byte response (longer than 32)", 40 },
	{ "32-byte response with pad[7]=1", 32 },
	{ "32-byte response carrying an SCM_RIGHTS fd", 32 },
	{ "16-byte response", 16 },
};

static int hook_bad(struct dev *d, const struct kvm_ioregionfd_cmd *c, int idx)
{
	unsigned char buf[64];
	uint64_t v = dev_val(c->user_data, c->offset);
	ssize_t r;

	(void)idx;
	memset(buf, 0, sizeof(buf));
	memcpy(buf, &v, 8);
	if (d->mode == 2)
		buf[8 + 7] = 1;		/* resp.pad[7] */
	if (d->mode == 3)
		r = send_with_fd(d->rfd, buf, 32);
	else
		r = send(d->rfd, buf, bad_resp[d->mode].len, MSG_NOSIGNAL);
	d->r[0] = r < 0 ? errno : 0;
	d->flag = 1;
	return ACT_NONE;
}

static void bad_response_case(int mode)
{
	struct tc t;
	char what[200];

	if (!tc_setup(&t, gb_read1, R0, 0x100, UD, 0, hook_bad))
		return;
	t.d.mode = mode;
	if (!dev_start(&t.d))
		return;
	snprintf(what, sizeof(what), "4-byte read answered with a %s", bad_resp[mode].what);
	if (!expect_failed(&t.vm, what, R0 + 0x40, 4, 0, 0, UD, -EPROTO)) {
		if (t.d.flag && t.d.r[0])
			failf("(test setup: sending the bad response failed: %s)", en(t.d.r[0]));
		return;
	}
	snprintf(what, sizeof(what), "after the %s", bad_resp[mode].what);
	if (hlt_clean(&t.vm, what))
		check_slot(&t.vm, 0, 0xFFFFFFFF, "failed 4-byte read (doc: all ones)");
}

static void c_eproto(void)
{
	for (int mode = 0; mode < 3; mode++)
		bad_response_case(mode);	/* a fresh VM for each */
}

/*
 * "From KVM_SET_IOREGION on, the sockets refuse messages that pass file
 * descriptors (the sender's sendmsg() fails with EPERM)": the device's
 * response with a descriptor is refused at its sendmsg(), and the plain
 * response it then sends completes the read.
 */
static int hook_fd(struct dev *d, const struct kvm_ioregionfd_cmd *c, int idx)
{
	unsigned char buf[32];
	uint64_t v = dev_val(c->user_data, c->offset);

	(void)idx;
	memset(buf, 0, sizeof(buf));
	memcpy(buf, &v, 8);
	d->r[0] = send_with_fd(d->rfd, buf, 32) < 0 ? errno : 0;
	d->flag = 1;
	return ACT_RESPOND;
}

static void c_rights(void)
{
	struct tc t;

	if (!tc_setup(&t, gb_read1, R0, 0x100, UD, 0, hook_fd) || !dev_start(&t.d))
		return;
	if (!hlt_clean(&t.vm, "read answered after a refused descriptor"))
		return;
	if (!t.d.flag || t.d.r[0] != EPERM)
		failf("sendmsg() of a response with SCM_RIGHTS: %s, expected EPERM",
		      t.d.flag ? en(t.d.r[0]) : "never sent");
	check_slot(&t.vm, 0, dev_val(UD, 0x40) & mask(4), "the read gets the plain response's value");
}

static void c_short(void)
{
	bad_response_case(4);
}

/* ------------------------------------------------------------------ */
/* Checks: signals, immediate_exit, concurrent ioctls                   */
/* ------------------------------------------------------------------ */
static int hook_signal(struct dev *d, const struct kvm_ioregionfd_cmd *c, int idx)
{
	(void)d; (void)c;
	if (idx != 0)
		return ACT_RESPOND;
	pthread_kill(g_main, SIGUSR1);	/* the vCPU thread; no response for now */
	return ACT_NONE;
}

struct later_flag {
	struct dev *d;
	uint64_t data;
	int ms;
	volatile int sent;
};

static void *later_flag_fn(void *arg)
{
	struct later_flag *l = arg;

	msleep(l->ms);
	__atomic_store_n(&l->sent, 1, __ATOMIC_SEQ_CST);	/* before the response */
	dev_send_resp(l->d, l->data);
	return NULL;
}

static int first_access_pending(struct tc *t, const char *what)
{
	g_usr1 = 0;
	vrun(&t->vm);
	if (!expect_intr(&t->vm, what, 1))
		return 0;
	if (!g_usr1)
		failf("internal: KVM_RUN returned EINTR before the test signal");
	if (dev_n(&t->d) != 1) {
		failf("the device task has %d command(s) at the KVM_EXIT_INTR, expected 1", dev_n(&t->d));
		return 0;
	}
	return 1;
}

static void c_sig_read(void)
{
	struct tc t;
	static struct later_flag l;
	pthread_t th;
	uint64_t v = dev_val(UD, 0x40);

	if (!tc_setup(&t, gb_read1, R0, 0x100, UD, 0, hook_signal) || !dev_start(&t.d))
		return;
	if (!first_access_pending(&t, "signal while the device withholds a read response"))
		return;
	cmd_is(&t.d.log[0], 0, KVM_IOREGIONFD_CMD_READ, 4, 1, UD, 0x40, 0);
	l.d = &t.d;
	l.data = v;
	l.ms = 200;
	if (!spawn(&th, later_flag_fn, &l, 1))
		return;
	if (!hlt_clean(&t.vm, "next KVM_RUN (device answers 200 ms later)"))
		return;
	if (!__atomic_load_n(&l.sent, __ATOMIC_SEQ_CST))
		failf("the guest finished before the device task answered; doc: the next KVM_RUN first waits for the response");
	check_slot(&t.vm, 0, v & 0xffffffff, "read completed after the signal");
	dev_expect_n(&t.d, 1, "the command is never sent again");
}

static void c_sig_pio(void)
{
	struct tc t;
	static struct later_flag l;
	pthread_t th;

	if (!tc_setup(&t, gb_pio_sync, PIO_W, 4, UD, PIOF, hook_signal) || !dev_start(&t.d))
		return;
	if (!first_access_pending(&t, "signal while the device withholds a PIO write response"))
		return;
	cmd_is(&t.d.log[0], 0, KVM_IOREGIONFD_CMD_WRITE, 4, 1, UD, 0, 0x600DF00D);
	l.d = &t.d;
	l.data = 0;
	l.ms = 200;
	if (!spawn(&th, later_flag_fn, &l, 1))
		return;
	if (!expect_sync(&t.vm, "next KVM_RUN (device answers 200 ms later): guest goes on to its next OUT"))
		return;
	if (!__atomic_load_n(&l.sent, __ATOMIC_SEQ_CST))
		failf("the guest went on before the device task answered; doc: the next KVM_RUN first waits for the response");
	if (hlt_clean(&t.vm, "end"))
		dev_expect_n(&t.d, 1, "the command is never sent again");
}

static void c_immediate(void)
{
	struct tc t;
	static struct later_flag l;
	pthread_t th;
	struct kvm_regs regs;
	uint64_t v = dev_val(UD, 0x40);

	if (!tc_setup(&t, gb_read1, R0, 0x100, UD, 0, hook_signal) || !dev_start(&t.d))
		return;
	if (!first_access_pending(&t, "signal while the device withholds a read response"))
		return;
	l.d = &t.d;
	l.data = v;
	l.ms = 200;
	if (!spawn(&th, later_flag_fn, &l, 1))
		return;
	t.vm.run->immediate_exit = 1;
	vrun(&t.vm);
	if (!expect_intr(&t.vm, "KVM_RUN with immediate_exit=1 and the access pending (device answers 200 ms later)", 0))
		return;
	if (!__atomic_load_n(&l.sent, __ATOMIC_SEQ_CST))
		failf("immediate_exit KVM_RUN returned before the device task answered; doc: it finishes the pending access, waiting for the device task if it must");
	if (ioctl(t.vm.vcpu, KVM_GET_REGS, &regs)) {
		failf("KVM_GET_REGS: %s", strerror(errno));
		return;
	}
	if (regs.rip != CODE_GPA + g_lbl || regs.rax != (v & 0xffffffff))
		failf("after the immediate_exit KVM_RUN rip=0x%llx rax=0x%llx, expected rip=0x%llx (instruction complete, not past it) rax=0x%llx",
		      (unsigned long long)regs.rip, (unsigned long long)regs.rax,
		      (unsigned long long)(CODE_GPA + g_lbl), (unsigned long long)(v & 0xffffffff));
	t.vm.run->immediate_exit = 0;
	if (!hlt_clean(&t.vm, "KVM_RUN after clearing immediate_exit"))
		return;
	check_slot(&t.vm, 0, v & 0xffffffff, "read completed by the immediate_exit KVM_RUN");
	dev_expect_n(&t.d, 1, "the command is never sent again");
}

static int hook_deassign(struct dev *d, const struct kvm_ioregionfd_cmd *c, int idx)
{
	long long t0;

	if (idx != 0)
		return ACT_RESPOND;
	t0 = now_ms();
	d->r[0] = ior(d->vmfd, R0, 0x100, UD, d->kfd, d->kfd, DEASSIGN);
	d->t[0] = now_ms() - t0;
	d->in_run[0] = g_in_run;
	msleep(100);
	d->in_run[1] = g_in_run;
	dev_send_resp(d, dev_val(c->user_data, c->offset));
	__atomic_store_n(&d->flag, 1, __ATOMIC_SEQ_CST);
	return ACT_NONE;
}

static void wait_flag(struct dev *d)
{
	long long end = now_ms() + DEV_WAIT_MS;

	while (!__atomic_load_n(&d->flag, __ATOMIC_SEQ_CST) && now_ms() < end)
		msleep(1);
}

static void c_deassign_wait(void)
{
	struct tc t;
	int ok;

	if (!tc_setup(&t, gb_deassign, R0, 0x100, UD, 0, hook_deassign) || !dev_start(&t.d))
		return;
	ok = expect_mmio(&t.vm, "second read of the range, after the DEASSIGN", R0 + 0x10, 4, 0, 0, 0x13579BDF);
	wait_flag(&t.d);
	if (!t.d.flag) {
		failf("the device task never got the first read's command or its DEASSIGN hung");
		return;
	}
	want("KVM_SET_IOREGION(DEASSIGN) while a vCPU waits for the region's device", t.d.r[0], 0);
	if (t.d.t[0] > 1000)
		failf("DEASSIGN took %lld ms while a vCPU waited; doc: it does not wait for the device task", t.d.t[0]);
	if (!t.d.in_run[0] || !t.d.in_run[1])
		failf("KVM_RUN returned before the device answered the command in flight; doc: a command already sent completes with the device's response");
	if (!ok || !hlt_clean(&t.vm, "end"))
		return;
	check_slot(&t.vm, 0, dev_val(UD, 0x10) & 0xffffffff, "read in flight during DEASSIGN (device's answer)");
	check_slot(&t.vm, 1, 0x13579BDF, "read after DEASSIGN (VMM's answer)");
	dev_expect_n(&t.d, 1, "only the first read reaches the device");
}

static int hook_ioctls(struct dev *d, const struct kvm_ioregionfd_cmd *c, int idx)
{
	struct kvm_userspace_memory_region mr;
	int *s2 = d->p;
	long long t0;

	if (idx != 0)
		return ACT_RESPOND;
	memset(&mr, 0, sizeof(mr));
	mr.slot = 1;
	mr.guest_phys_addr = 0x200000;
	mr.memory_size = 0x1000;
	mr.userspace_addr = (uintptr_t)mmap(NULL, 0x1000, PROT_READ | PROT_WRITE,
					    MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	t0 = now_ms();
	d->r[0] = ioctl(d->vmfd, KVM_SET_USER_MEMORY_REGION, &mr) ? errno : 0;
	d->t[0] = now_ms() - t0;
	t0 = now_ms();
	d->r[1] = mk_ioeventfd(d->vmfd, R0 + 0x5000, 4, 0);
	d->t[1] = now_ms() - t0;
	t0 = now_ms();
	d->r[2] = ior(d->vmfd, R0 + 0x6000, 0x100, UD2, s2[0], s2[0], 0);
	d->t[2] = now_ms() - t0;
	d->in_run[0] = g_in_run;
	dev_send_resp(d, dev_val(c->user_data, c->offset));
	__atomic_store_n(&d->flag, 1, __ATOMIC_SEQ_CST);
	return ACT_NONE;
}

static void c_ioctls_wait(void)
{
	struct tc t;
	static int s2[2];
	static const char *names[3] = {
		"KVM_SET_USER_MEMORY_REGION (new slot)", "KVM_IOEVENTFD", "KVM_SET_IOREGION (another region)",
	};
	int ok;

	if (!tc_setup(&t, gb_read1, R0, 0x100, UD, 0, hook_ioctls) || !seqpair(s2))
		return;
	t.d.p = s2;
	if (!dev_start(&t.d))
		return;
	ok = hlt_clean(&t.vm, "read whose device task runs VM ioctls before answering");
	wait_flag(&t.d);
	if (!t.d.flag) {
		failf("the device task never got the command, or its VM ioctls hung");
		return;
	}
	for (int i = 0; i < 3; i++) {
		char what[128];

		snprintf(what, sizeof(what), "%s while a vCPU waits for the device", names[i]);
		want(what, t.d.r[i], 0);
		if (t.d.t[i] > 1000)
			failf("%s took %lld ms while a vCPU waited; doc: it goes on", names[i], t.d.t[i]);
	}
	if (!t.d.in_run[0])
		failf("the vCPU was not in KVM_RUN while the ioctls ran (it should have been waiting)");
	if (ok)
		check_slot(&t.vm, 0, dev_val(UD, 0x40) & 0xffffffff, "read answered after the ioctls");
}

static void c_after_deassign(void)
{
	struct tc t;

	if (!tc_setup(&t, gb_after, R0, 0x100, UD, 0, NULL))
		return;
	if (!ior_ok(t.vm.fd, "PIO region [0x6c0, +4)", PIO_D, 4, UD2, t.s[0], t.s[0], PIOF))
		return;
	if (!want("DEASSIGN MMIO region", ior(t.vm.fd, R0, 0x100, UD, t.s[0], t.s[0], DEASSIGN), 0) ||
	    !want("DEASSIGN PIO region", ior(t.vm.fd, PIO_D, 4, UD2, t.s[0], t.s[0], PIOF | DEASSIGN), 0))
		return;
	if (!dev_start(&t.d))
		return;
	if (!expect_mmio(&t.vm, "MMIO write to a deassigned range", R0 + 0x8, 4, 1, 0x0BADCAFE, 0) ||
	    !expect_mmio(&t.vm, "MMIO read of a deassigned range", R0 + 0xC, 4, 0, 0, 0x24681357) ||
	    !expect_io(&t.vm, "OUT to a deassigned port range", PIO_D + 1, 1, KVM_EXIT_IO_OUT, 0x77, 0) ||
	    !expect_io(&t.vm, "IN from a deassigned port range", PIO_D + 2, 2, KVM_EXIT_IO_IN, 0, 0x9ABC) ||
	    !hlt_clean(&t.vm, "end"))
		return;
	check_slot(&t.vm, 0, 0x24681357, "MMIO read answered by the VMM");
	check_slot(&t.vm, 1, 0x9ABC, "IN answered by the VMM");
	dev_expect_n(&t.d, 0, "nothing reaches the device after DEASSIGN");
}

/* ------------------------------------------------------------------ */
/* Driver                                                               */
/* ------------------------------------------------------------------ */
static const struct check {
	void (*fn)(void);
	const char *desc;
} checks[] = {
	{ c_cap, "KVM_CHECK_EXTENSION(KVM_CAP_IOREGIONFD) > 0" },
	{ c_einval, "EINVAL for unknown flags, nonzero pad, size 0 without POSTED_WRITES, size >= 2^31, wrapping range, PIO beyond 0xffff; EFAULT for a bad pointer; boundary cases accepted" },
	{ c_ebadf, "EBADF when read_fd/write_fd is not an open descriptor" },
	{ c_enotsock, "ENOTSOCK when read_fd/write_fd is not a socket" },
	{ c_eprototype, "EPROTOTYPE for sockets other than AF_UNIX SOCK_SEQPACKET (unix stream/dgram, TCP)" },
	{ c_enotconn, "ENOTCONN for unconnected and listening SEQPACKET sockets" },
	{ c_ebusy, "one pair may serve several regions (also via dup); EBUSY for a socket of another pair or another VM" },
	{ c_eexist_ioregion, "EEXIST for overlapping ioregions on one bus; adjacent ranges and the other bus are fine" },
	{ c_eexist_ioeventfd, "EEXIST both ways between ioregions and ioeventfds (MMIO, zero-length, PIO)" },
	{ c_eexist_coalesced, "EEXIST both ways between ioregions and coalesced MMIO/PIO zones" },
	{ c_eexist_irqchip, "EEXIST both ways between ioregions and the in-kernel PIC/IOAPIC (KVM_CREATE_IRQCHIP)" },
	{ c_eexist_pit, "EEXIST both ways between ioregions and the in-kernel PIT (0x40-0x43, 0x61-0x64 with KVM_PIT_SPEAKER_DUMMY)" },
	{ c_enoent, "DEASSIGN: ENOENT unless guest_paddr, memory_size and bus match exactly; fds and user_data not compared" },
	{ c_mmio_fmt, "MMIO 1/2/4/8-byte writes and reads: command fields (cmd, info size|RESP, pad, user_data, offset, data), reads get the response's low bytes; VMM may close its fds" },
	{ c_pio_fmt, "PIO 1/2/4-byte OUT and IN: command fields, IN gets the response's low bytes" },
	{ c_two, "separate read_fd and write_fd sockets; two regions sharing a pair carry their own user_data and offsets" },
	{ c_nonposted, "a write to a region without POSTED_WRITES waits for the device task's response" },
	{ c_posted, "POSTED_WRITES: writes are sent without RESP and the vCPU does not wait; reads still wait" },
	{ c_zero, "memory_size 0 (posted): writes starting at guest_paddr go to the device (first 8 bytes of a 16-byte one), other writes and reads to the VMM" },
	{ c_string, "string I/O (rep outsw, rep insb): one command per element" },
	{ c_cross, "page-crossing 8-byte write / 4-byte read: pieces 2,1|4,1 and 1|2,1 in address order" },
	{ c_sse16, "16-byte accesses (movdqu) reach the region as two 8-byte pieces" },
	{ c_partial, "accesses only partly inside a region, or spanning two regions, go to the VMM" },
	{ c_epipe, "device closes its socket after reading: KVM_EXIT_IOREGIONFD_FAILED -EPIPE with PENDING; read completes as all ones; later accesses fail too" },
	{ c_econnreset, "device closes its socket with the command unread: KVM_EXIT_IOREGIONFD_FAILED -ECONNRESET; read completes as all ones" },
	{ c_eproto, "bad responses (empty, 40 bytes, nonzero pad): KVM_EXIT_IOREGIONFD_FAILED -EPROTO; read completes as all ones" },
	{ c_rights, "KVM's sockets refuse descriptors: a response with SCM_RIGHTS fails at the device's sendmsg() with EPERM" },
	{ c_short, "16-byte response is a wrong-size response: -EPROTO [doc ambiguous: KVM_SET_IOREGION lists only empty and longer-than-32 sizes]" },
	{ c_sig_read, "signal while a read response is withheld: -EINTR, KVM_EXIT_INTR, PENDING; command sent once; next KVM_RUN waits and the guest gets the value" },
	{ c_sig_pio, "signal while a PIO OUT response is withheld: -EINTR, KVM_EXIT_INTR, PENDING; next KVM_RUN waits, then the guest goes on" },
	{ c_immediate, "immediate_exit with an access pending: waits for the response, returns -EINTR/KVM_EXIT_INTR with PENDING clear, instruction complete (RIP, RAX)" },
	{ c_deassign_wait, "DEASSIGN while a vCPU waits returns promptly; the access in flight gets the device's answer; the next access goes to the VMM" },
	{ c_ioctls_wait, "while a vCPU waits for the device, memslot update, KVM_IOEVENTFD and KVM_SET_IOREGION proceed" },
	{ c_after_deassign, "after DEASSIGN, MMIO and PIO accesses exit to the VMM as KVM_EXIT_MMIO / KVM_EXIT_IO" },
};

static void sanitize(char *s)
{
	for (; *s; s++)
		if (*s == '\n' || *s == '\r')
			*s = ' ';
}

static int run_check(int num, const struct check *c)
{
	char buf[sizeof(g_msg) + sizeof(g_note) + 8];
	size_t n = 0;
	long long end = now_ms() + CHECK_TIMEOUT_MS;
	int p[2], st = 0, timed_out = 0, reaped = 0;
	pid_t pid;

	if (pipe(p)) {
		printf("not ok %d - %s: pipe: %s\n", num, c->desc, strerror(errno));
		return 0;
	}
	fflush(stdout);
	fflush(stderr);
	pid = fork();
	if (pid < 0) {
		printf("not ok %d - %s: fork: %s\n", num, c->desc, strerror(errno));
		return 0;
	}
	if (pid == 0) {
		char tag;
		const char *m;

		close(p[0]);
		child_setup();
		c->fn();
		tag = g_nfail ? 'F' : 'P';
		m = g_nfail ? g_msg : g_note;
		if (write(p[1], &tag, 1) != 1 || write(p[1], m, strlen(m)) < 0)
			_exit(2);
		close(p[1]);
		_exit(0);
	}
	close(p[1]);
	for (;;) {
		struct pollfd pfd = { .fd = p[0], .events = POLLIN };
		long long left = end - now_ms();
		ssize_t r;

		if (left <= 0) {
			timed_out = 1;
			break;
		}
		if (poll(&pfd, 1, (int)left) <= 0)
			continue;
		r = read(p[0], buf + n, sizeof(buf) - 1 - n);
		if (r <= 0)
			break;
		n += r;
		if (n >= sizeof(buf) - 1)
			break;
	}
	close(p[0]);
	buf[n] = 0;
	if (timed_out)
		kill(pid, SIGKILL);
	for (int i = 0; i < 200; i++) {	/* reap, bounded (a child stuck in the kernel may not die) */
		if (waitpid(pid, &st, WNOHANG) == pid) {
			reaped = 1;
			break;
		}
		msleep(10);
	}
	sanitize(buf);
	if (n > 0 && buf[0] == 'P') {
		printf("ok %d - %s%s\n", num, c->desc, buf + 1);
		return 1;
	}
	if (n > 0 && buf[0] == 'F')
		printf("not ok %d - %s: %s\n", num, c->desc, buf + 1);
	else if (timed_out)
		printf("not ok %d - %s: the check did not finish within %d s (something hung in the kernel; child killed)\n",
		       num, c->desc, CHECK_TIMEOUT_MS / 1000);
	else if (reaped && WIFSIGNALED(st))
		printf("not ok %d - %s: the check process died with signal %d\n", num, c->desc, WTERMSIG(st));
	else
		printf("not ok %d - %s: the check process ended without a result\n", num, c->desc);
	return 0;
}

static int dump_guests(const char *dir)
{
	for (size_t i = 0; i < ARRAY_SIZE(guests); i++) {
		static uint8_t code[CODE_MAX];
		struct asmb a = { code, 0, CODE_MAX, 0 };
		char path[512];
		FILE *f;

		guests[i].fn(&a);
		snprintf(path, sizeof(path), "%s/%s.bin", dir, guests[i].name);
		f = fopen(path, "wb");
		if (!f || fwrite(code, 1, a.n, f) != a.n || a.overflow) {
			perror(path);
			return 1;
		}
		fclose(f);
	}
	return 0;
}

int main(int argc, char **argv)
{
	int pass = 0, fail = 0;

	if (argc == 3 && !strcmp(argv[1], "--dump-guests"))
		return dump_guests(argv[2]);
	setvbuf(stdout, NULL, _IOLBF, 0);
	signal(SIGPIPE, SIG_IGN);
	for (size_t i = 0; i < ARRAY_SIZE(checks); i++) {
		if (run_check(i + 1, &checks[i]))
			pass++;
		else
			fail++;
	}
	printf("%d passed, %d failed\n", pass, fail);
	return fail ? 1 : 0;
}
