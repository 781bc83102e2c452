// Loopback TCP ceiling of this machine: N sender/receiver thread pairs over
// 127.0.0.1, each moving BYTES MiB with plain write/read of 4 MiB buffers, all at
// once. The figure the ft-bench ec-cluster ratios run into on a one-host "cluster".
//   clang -O2 -pthread -o /tmp/loopback-ceiling scripts/loopback-ceiling.c
//   for n in 1 2 4 8; do /tmp/loopback-ceiling $n 2048; done
#include <arpa/inet.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>
static long BYTES; static int port0;
static double now(){struct timespec t;clock_gettime(CLOCK_MONOTONIC,&t);return t.tv_sec+t.tv_nsec*1e-9;}
static void* rx(void* a){int i=(int)(long)a;int l=socket(AF_INET,SOCK_STREAM,0);int one=1;setsockopt(l,SOL_SOCKET,SO_REUSEADDR,&one,4);
 struct sockaddr_in s={.sin_family=AF_INET,.sin_port=htons(port0+i),.sin_addr.s_addr=htonl(0x7f000001)};bind(l,(void*)&s,sizeof s);listen(l,1);
 int c=accept(l,0,0);char*b=malloc(4<<20);long got=0;while(got<BYTES){long n=read(c,b,4<<20);if(n<=0)break;got+=n;}close(c);close(l);return 0;}
static void* tx(void* a){int i=(int)(long)a;usleep(200000);int c=socket(AF_INET,SOCK_STREAM,0);
 struct sockaddr_in s={.sin_family=AF_INET,.sin_port=htons(port0+i),.sin_addr.s_addr=htonl(0x7f000001)};connect(c,(void*)&s,sizeof s);
 char*b=malloc(4<<20);memset(b,1,4<<20);long sent=0;while(sent<BYTES){long n=write(c,b,4<<20);if(n<=0)break;sent+=n;}close(c);return 0;}
int main(int argc,char**argv){int n=atoi(argv[1]);BYTES=atol(argv[2])<<20;port0=40000+getpid()%10000;pthread_t r[16],t[16];
 for(int i=0;i<n;i++)pthread_create(&r[i],0,rx,(void*)(long)i);double t0=now()+0.2;for(int i=0;i<n;i++)pthread_create(&t[i],0,tx,(void*)(long)i);
 for(int i=0;i<n;i++){pthread_join(t[i],0);pthread_join(r[i],0);}double dt=now()-t0;
 printf("%d streams x %ld MiB: %.2f s, aggregate %.2f GB/s, per stream %.2f GB/s\n",n,BYTES>>20,dt,n*BYTES/dt/1e9,BYTES/dt/1e9);}
