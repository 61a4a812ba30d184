//! Boot assembly: the PVH ELF note, the 32-bit PVH entry of the BSP, the real-mode AP
//! trampoline, the static identity page tables (0..4 GiB in 2 MiB pages), the GDT, the 256
//! interrupt stubs and the small CPL0 helpers (enter user mode, halt).
//!
//! Everything here runs at CPL0, which this project's host interprets: it is kept short.

use crate::kernel::{KSTACK, MAX_CPUS};

/// Address the AP trampoline is copied to (SIPI vector 0x08).
pub const TRAMPOLINE: u64 = 0x8000;

// Selectors (see the GDT below).
pub const SEL_KCODE: u64 = 0x08;
pub const SEL_UDATA: u64 = 0x23;
pub const SEL_UCODE: u64 = 0x2b;
pub const SEL_TSS0: u64 = 0x30;

core::arch::global_asm!(
    r#"
/* ---------------- PVH note (XEN_ELFNOTE_PHYS32_ENTRY = 18) ---------------- */
.section .note.pvh, "a", @note
.balign 4
.long 4
.long 4
.long 18
.asciz "Xen"
.balign 4
.long pvh_start
.balign 4

/* ---------------- 32-bit entries ---------------- */
.section .text.entry32, "ax"
.code32
.global pvh_start
pvh_start:
    cli
    movl %ebx, start_info_ptr
    rdtsc
    movl %eax, boot_tsc
    movl %edx, boot_tsc+4
    lgdt gdtr
    movl $0x10, %eax
    movl %eax, %ds
    movl %eax, %es
    movl %eax, %ss
    movl %eax, %fs
    movl %eax, %gs
    movl %cr4, %eax
    orl $0x620, %eax           /* PAE | OSFXSR | OSXMMEXCPT */
    movl %eax, %cr4
    movl $pml4, %eax
    movl %eax, %cr3
    movl $0xC0000080, %ecx
    rdmsr
    orl $0x100, %eax           /* EFER.LME */
    wrmsr
    movl %cr0, %eax
    andl $0x9FFFFFFB, %eax     /* clear CD, NW, EM */
    orl $0x80010023, %eax      /* PG | WP | NE | MP | PE */
    movl %eax, %cr0
    ljmp $0x08, $bsp_entry64

.global ap_entry32
ap_entry32:
    movl $0x10, %eax
    movl %eax, %ds
    movl %eax, %es
    movl %eax, %ss
    movl %eax, %fs
    movl %eax, %gs
    movl %cr4, %eax
    orl $0x620, %eax
    movl %eax, %cr4
    movl $pml4, %eax
    movl %eax, %cr3
    movl $0xC0000080, %ecx
    rdmsr
    orl $0x100, %eax
    wrmsr
    movl %cr0, %eax
    andl $0x9FFFFFFB, %eax
    orl $0x80010023, %eax
    movl %eax, %cr0
    ljmp $0x08, $ap_entry64

.code64
bsp_entry64:
    movl $0x10, %eax
    movl %eax, %ds
    movl %eax, %es
    movl %eax, %ss
    leaq kstacks+{kstack}(%rip), %rsp
    xorl %ebp, %ebp
    call bsp_main
    jmp khalt_forever

/* An AP takes the next CPU index unless the BSP has closed the gate (bit 63). */
ap_entry64:
    movl $0x10, %eax
    movl %eax, %ds
    movl %eax, %es
    movl %eax, %ss
1:  movq ap_arrive(%rip), %rax
    btq $63, %rax
    jc khalt_forever
    cmpq ${maxap}, %rax
    jae khalt_forever
    leaq 1(%rax), %rcx
    lock cmpxchgq %rcx, ap_arrive(%rip)
    jne 1b
    movq %rcx, %rdi            /* cpu index = new count */
    leaq 1(%rcx), %rax
    shlq ${kshift}, %rax
    leaq kstacks(%rip), %rsp
    addq %rax, %rsp
    xorl %ebp, %ebp
    call ap_main
    jmp khalt_forever

/* ---------------- CPL0 helpers ---------------- */
.global khalt_forever
khalt_forever:
    cli
2:  hlt
    jmp 2b

/* Wait for one interrupt with interrupts enabled only around hlt. */
.global kidle_hlt
kidle_hlt:
    sti
    hlt
    cli
    ret

/* enter_user(rip, rsp, arg): iretq to CPL3 with IF set. */
.global enter_user
enter_user:
    pushq ${udata}
    pushq %rsi
    pushq $0x202
    pushq ${ucode}
    pushq %rdi
    movq %rdx, %rdi
    xorl %eax, %eax
    xorl %ecx, %ecx
    xorl %edx, %edx
    xorl %esi, %esi
    xorl %r8d, %r8d
    xorl %r9d, %r9d
    xorl %r10d, %r10d
    xorl %r11d, %r11d
    xorl %ebp, %ebp
    iretq

/* ---------------- interrupt stubs: 16 bytes each ---------------- */
.section .text.isr, "ax"
.balign 16
.global isr_stubs
isr_stubs:
.set vec, 0
.rept 256
.balign 16
.if vec < 32
.if (0x60227D00 >> vec) & 1
    pushq $vec
.else
    pushq $0
    pushq $vec
.endif
.else
    pushq $0
    pushq $vec
.endif
    jmp isr_common
.set vec, vec + 1
.endr

isr_common:
    pushq %rax
    pushq %rcx
    pushq %rdx
    pushq %rsi
    pushq %rdi
    pushq %r8
    pushq %r9
    pushq %r10
    pushq %r11
    movq %rsp, %rdi
    cld
    call isr_dispatch
    popq %r11
    popq %r10
    popq %r9
    popq %r8
    popq %rdi
    popq %rsi
    popq %rdx
    popq %rcx
    popq %rax
    addq $16, %rsp
    iretq

/* ---------------- AP trampoline (copied to 0x8000, entered in real mode) ---------------- */
.section .rodata.tramp, "a"
.code16
.global tramp_start
.global tramp_end
tramp_start:
    cli
    xorw %ax, %ax
    movw %ax, %ds
    lgdtl (0x8000 + tramp_gdtr - tramp_start)
    movl %cr0, %eax
    orl $1, %eax
    movl %eax, %cr0
    ljmpl $0x18, $ap_entry32
.balign 8
tramp_gdtr:
    .word gdt_end - gdt - 1
    .long gdt
tramp_end:
.code64

/* ---------------- data: GDT, boot words, page tables ---------------- */
.section .data.boot, "aw"
.balign 16
.global gdt
gdt:
    .quad 0
    .quad 0x00AF9A000000FFFF   /* 0x08 kernel code 64 */
    .quad 0x00CF92000000FFFF   /* 0x10 kernel data */
    .quad 0x00CF9A000000FFFF   /* 0x18 kernel code 32 (AP trampoline) */
    .quad 0x00CFF2000000FFFF   /* 0x20 user data (0x23) */
    .quad 0x00AFFA000000FFFF   /* 0x28 user code 64 (0x2b) */
    .fill {ntss}, 8, 0         /* 0x30.. one 16-byte TSS descriptor per CPU */
.global gdt_end
gdt_end:
.balign 8
.global gdtr
gdtr:
    .word gdt_end - gdt - 1
    .quad gdt
.global start_info_ptr
start_info_ptr: .quad 0
.global boot_tsc
boot_tsc: .quad 0
.global ap_arrive
ap_arrive: .quad 0

.section .data.pt, "aw"
.balign 4096
.global pml4
pml4:
    .quad pdpt + 0x7
    .fill 511, 8, 0
.global pdpt
pdpt:
    .quad pd_low + 0x7
    .quad pd_low + 0x1007
    .quad pd_low + 0x2007
    .quad pd_low + 0x3007
    .fill 508, 8, 0
pd_low:
.set i, 0
.rept 1536
    .quad (i << 21) | 0x87     /* P RW US PS: RAM, write-back */
.set i, i + 1
.endr
.rept 512
    .quad (i << 21) | 0x9F     /* + PWT PCD: the 3..4 GiB MMIO hole */
.set i, i + 1
.endr
.text
"#,
    kstack = const KSTACK,
    kshift = const crate::kernel::KSTACK_SHIFT,
    maxap = const (MAX_CPUS - 1),
    udata = const SEL_UDATA,
    ucode = const SEL_UCODE,
    ntss = const (2 * MAX_CPUS),
    options(att_syntax)
);

extern "C" {
    pub fn khalt_forever() -> !;
    pub fn kidle_hlt();
    pub fn enter_user(rip: u64, rsp: u64, arg: u64) -> !;
    pub static isr_stubs: [u8; 4096];
    pub static tramp_start: u8;
    pub static tramp_end: u8;
    pub static mut gdt: [u64; 6 + 2 * MAX_CPUS];
    pub static start_info_ptr: u64;
    pub static boot_tsc: u64;
    pub static ap_arrive: core::sync::atomic::AtomicU64;
    pub static mut pdpt: [u64; 512];
    pub static __image_end: u8;
}

/// APs that have taken a CPU index so far.
pub fn ap_arrive_count() -> u64 {
    unsafe { ap_arrive.load(core::sync::atomic::Ordering::Acquire) & !(1 << 63) }
}
