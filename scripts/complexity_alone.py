#!/usr/bin/python3
# complexity_alone.py - a model-free reference for the energy_complexity score:
#   the AUROC of the deflate length alone (low = OOD), Fashion-MNIST test (positive) vs
#   the first 2000 images of each OOD set, inputs padded to 32x32 as the model sees them.
import gzip, numpy as np, zlib
def idx(p):
    b=gzip.open(p).read(); n=int.from_bytes(b[4:8],'big'); return np.frombuffer(b,np.uint8,offset=16).reshape(n,28,28)
def bits(a):
    a=np.pad(a,((0,0),(2,2),(2,2)))
    return np.array([len(zlib.compress(im.tobytes(),9))*8 for im in a],float)
def auroc(pos,neg):
    # P(pos > neg) + 0.5 P(tie), via midranks
    a=np.concatenate([pos,neg]); order=a.argsort(kind='mergesort'); s=a[order]
    ranks=np.empty(len(a)); i=0
    while i<len(s):
        j=i
        while j+1<len(s) and s[j+1]==s[i]: j+=1
        ranks[order[i:j+1]]=(i+j)/2+1; i=j+1
    rp=ranks[:len(pos)].sum()
    return (rp-len(pos)*(len(pos)+1)/2)/(len(pos)*len(neg))
t=bits(idx('/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz'))
print('test mean bits %.0f'%t.mean())
for s in ['mnist','uniform','gaussian','vflip','interp','constant','letters']:
    b=bits(idx(f'/work/main/data/ood/{s}-images-idx3-ubyte.gz')[:2000])
    print('%-9s mean bits %5.0f  AUROC (low = OOD) %.3f'%(s,b.mean(),auroc(t,b)))
