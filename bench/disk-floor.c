/* The disk floor under the VMMs: 4 KiB random pread/pwrite on a file, in N threads (one
 * request each, so N = queue depth), for 3 s. What bench/results/disk.md compares the guest's
 * depth-1 cache=none numbers with. Build and run:
 *   gcc -O2 -pthread -o /tmp/disk-floor bench/disk-floor.c
 *   dd if=/dev/urandom of=target/floor.img bs=1M count=256
 *   /tmp/disk-floor target/floor.img QD WRITE(0|1) O_DIRECT(0|1) */
#define _GNU_SOURCE
#include <fcntl.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
static double now(){struct timespec t;clock_gettime(CLOCK_MONOTONIC,&t);return t.tv_sec+t.tv_nsec/1e9;}
static int fd; static size_t fsz=256<<20; static int wr; static double dur=3; static long counts[64];
static void* run(void*a){ long id=(long)a; void*buf; posix_memalign(&buf,4096,4096); memset(buf,0x5a,4096);
  unsigned s=id*7919+1; double end=now()+dur; long n=0;
  while(now()<end){ for(int k=0;k<64;k++){ s=s*1103515245+12345; off_t o=((off_t)(s%(fsz/4096)))*4096;
      if(wr? pwrite(fd,buf,4096,o)!=4096 : pread(fd,buf,4096,o)!=4096){perror("io");exit(1);} n++; } }
  counts[id]=n; return 0; }
int main(int c,char**v){ const char*path=v[1]; int qd=atoi(v[2]); wr=atoi(v[3]); int direct=atoi(v[4]);
  fd=open(path,O_RDWR|(direct?O_DIRECT:0)); if(fd<0){perror("open");return 1;}
  pthread_t t[64]; double t0=now(); for(long i=0;i<qd;i++) pthread_create(&t[i],0,run,(void*)i);
  long tot=0; for(int i=0;i<qd;i++){pthread_join(t[i],0); tot+=counts[i];} double el=now()-t0;
  printf("%s %s qd=%d: %.0f IOPS, mean latency %.1f us\n", direct?"O_DIRECT":"cached", wr?"randwrite4k":"randread4k", qd, tot/el, el*qd/tot*1e6); return 0; }
