"""Research sketch for issue #19 (not product code): a re-implementation, written
here, of the JellyBean optimizer path the VQA example takes (threshold-filtered
variant combinations, multiple-tier greedy worker assignment, tier-aware
communication cost). `python docs/research/jellybean_vqa_sim.py` prints
compute 6.242 + communication 1.2668 for (resnet18, wav2vec2-large), the
published result. See jellybean_optimizer.md for the semantics."""
# Verification re-implementation (own code) of JellyBean VQA optimizer path.
import csv, json, itertools, math, sys
import os
D=os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', '..', '..', 'shared', 'data', 'jellybean_vqa') + os.sep
def rows(f):
    out=[]
    for r in csv.reader(open(D+f)):
        if not r: continue
        out.append(r)
    return out
workers=[r[0] for r in rows('workers_specs.csv')]; price={r[0]:float(r[1]) for r in rows('workers_specs.csv')}
widx={w:i for i,w in enumerate(workers)}
S=float(sys.argv[1]) if len(sys.argv)>1 else 0.1
w2w={}
for a,b,c in rows('workers_workers_link.csv'): w2w[(a,b)]=float(c)*S
s2w={}
for s,w,c in rows('sources_workers_link.csv'): s2w[(s,w)]=float(c)*S
edges=[(r[0],r[1]) for r in rows('logical_graph.csv')]
ratio={(r[0],r[1]):float(r[2]) for r in rows('throughput_normalization_ratios.csv')}
lat={}
for r in rows('execution_profile.csv'):
    lat.setdefault((r[0],r[1]),{})[r[2]]=float(r[3])
msg={}
for u,v,um,vm,s in rows('message_sizes.csv'): msg.setdefault((u,v),{})[(um,vm)]=float(s)
rates={r[0]:float(r[1]) for r in rows('input_injection_rates.csv')}
part=json.load(open(D+'workers_partition.json')); tier={w:i for i,p in enumerate(part) for w in p}
acc=json.load(open(D+'accuracy_profiles.json'))
preds={}
for u,v in edges: preds.setdefault(v,set()).add(u); preds.setdefault(u,set())
nodes=list(preds)
def topo_orders():
    res=[]
    def rec(order,rem):
        if not rem: res.append(list(order)); return
        for n in sorted(rem):
            if preds[n] <= set(order): rec(order+[n],rem-{n})
    rec([],set(nodes)); return res
K=3600/1024/1024
def assign(ma, verbose=False):
    tp={(v,w):1000.0/p[ma.get(v,'default')] for (v,w),p in lat.items()}
    def ms(u,v):
        p=msg[(u,v)]; a,b=ma.get(u,'default'),ma.get(v,'default')
        if (a,b) in p: return p[(a,b)]
        if ('default',b) in p: return p[('default',b)]
        if (a,'default') in p: return p[(a,'default')]
        return p[('default','default')]
    best=[]
    for order in topo_orders():
        states=[dict(oc=0.,cc=0.,tiers={},wa={},used=set())]
        need={}
        for v in order:
            ins=preds[v]
            need[v]=rates[v] if v in rates else min(need[u]*ratio[(u,v)] for u in ins)
            E=need[v]; new=[]
            for st in states:
                if v in rates:
                    s=dict(st); s['tiers']=dict(st['tiers']); s['tiers'][v]=-1; new.append(s); continue
                hi=max(0,max(st['tiers'][u] for u in ins))
                for i in range(hi,len(part)):
                    avail=[w for w in workers if hi<=tier[w]<=i and w not in st['used'] and (v,w) in tp]
                    lt=min([tier[w] for w in avail],default=0)
                    def commfix(w,bw_scale):  # bw_scale: rate used for source edge / fraction for w2w
                        c=0.
                        for u in ins:
                            if u in rates: c+=s2w.get((u,w),0.)*bw_scale*ms(u,v)*K
                            else:
                                tot=E*ms(u,v)
                                for uw,ut in st['wa'][u]:
                                    c+=w2w.get((uw,w),0.)*(ut*tot/need[u])*K
                        return c
                    sat=[w for w in avail if tier[w]==lt and tp[(v,w)]>=E]
                    if sat:
                        L=[(w,price[w]+commfix(w,E)) for w in sat]; L.sort(key=lambda x:(x[1],tp[(v,x[0])]))
                    else:
                        L=[]
                        for w in avail:
                            c=0.; t=tp[(v,w)]
                            for u in ins:
                                if u in rates: c+=s2w.get((u,w),0.)*t*ms(u,v)*K
                                else:
                                    tot=E*ms(u,v)
                                    for uw,ut in st['wa'][u]:
                                        c+=w2w.get((uw,w),0.)*(ut*tot/need[u])*t/E*K
                            L.append((w,(price[w]+c)/t,price[w]+c))
                        L.sort(key=lambda x:(x[1],x[2]))
                    ta=[]; tt=0.
                    while tt<E:
                        if not L: break
                        w=L.pop(0)[0]; m=tp[(v,w)]
                        a=E-tt if tt+m>E else m
                        ta.append((w,a)); tt+=a
                        if tt<E:
                            lt=min([tier[x[0]] for x in L],default=0)
                            sat=[x[0] for x in L if tier[x[0]]==lt and tp[(v,x[0])]>E-tt]
                            if sat:
                                L=[(w2,price[w2]+commfix(w2,E-tt)) for w2 in sat]  # NOTE: w2w part uses full u_tx (prototype quirk)
                                L.sort(key=lambda x:(x[1],tp[(v,x[0])]))
                    if tt>=E:
                        cc=sum(price[w] for w,_ in ta); cm=0.
                        for u in ins:
                            tot=E*ms(u,v)
                            if u in rates:
                                for w,a in ta: cm+=s2w.get((u,w),0.)*(a*tot/E)*K
                            else:
                                for uw,ut in st['wa'][u]:
                                    for w,a in ta:
                                        cm+=w2w.get((uw,w),0.)*(ut*tot/need[u])*(a*tot/E/tot)*K
                        s=dict(oc=st['oc']+cc+cm,cc=st['cc']+cc,tiers=dict(st['tiers']),wa=dict(st['wa']),used=set(st['used'])|{w for w,_ in ta})
                        s['tiers'][v]=max(tier[w] for w,_ in ta); s['wa'][v]=list(ta); new.append(s)
            new.sort(key=lambda x:x['oc']); states=new[:10]
        for st in states: best.append(st)
        best.sort(key=lambda x:x['oc']); best=best[:10]
    return best, need, ms
def final_comm(wa, need, ms):
    c=0.
    for u,v in edges:
        tot=need[v]*ms(u,v)
        if u in rates:
            for w,a in wa[v]:
                if tier[w]>0: c+=s2w.get((u,w),0.)*(a*tot/need[v])*K
        else:
            for uw,ut in wa[u]:
                for vw,vt in wa[v]:
                    tu,tv=tier[uw],tier[vw]
                    if tv<tu: c=float('inf')
                    elif tv>tu: c+=w2w.get((uw,vw),0.)*(ut*tot/need[u])*(vt*tot/need[v]/tot)*K
    return c
combos=[(tuple(e['variants']),e['accuracy']) for e in acc['end_to_end']['accuracy']]
ops=acc['end_to_end']['operators']
only_feasible = '--all' not in sys.argv
for vs,a in combos:
    if only_feasible and a<56.0: continue
    ma=dict(zip(ops,vs)); ma['VQA']='default'
    best,need,ms=assign(ma)
    if not best: print(vs,'infeasible'); continue
    res=[]
    for st in best:
        fc=final_comm(st['wa'],need,ms); res.append((st['cc']+fc,st['cc'],fc,st))
    mn=min(res,key=lambda x:x[0])
    print(vs,a,'cost',round(mn[1],4),'comm',mn[2],'total',round(mn[0],4),{k:[(w,round(t,3)) for w,t in x] for k,x in mn[3]['wa'].items()})
    if '-v' in sys.argv:
        for r in res: print('   ',round(r[0],4),round(r[1],3),round(r[2],4),round(r[3]['oc'],4),{k:[w for w,t in x] for k,x in r[3]['wa'].items()})
